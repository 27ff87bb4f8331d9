"""A task's demonstrations, stored once: one content-addressed value in the durable blob store
(contract/blobs.py `shared`, zlib-compressed JSON) that the task record names by key (`demos_key`),
referenced by the ids of the tasks that hold it. Records written before hold them inline in `task`."""

from __future__ import annotations

import hashlib
import json
import zlib
from typing import Any

from contract.blobs import shared
from model.settings import Settings

PREFIX = "demos/"
REFS = "ms:demos_refs:"  # + key -> set of the ids of the task records that name it


class DemosGone(RuntimeError):
    """The record names demonstrations the store no longer has."""


def demos_key(tenant: str, demonstrations: list[dict[str, Any]]) -> str:
    """The key of these demonstrations: their content's sha256 (with the tenant: no tenant's
    value is ever another's, so deleting one's tasks never touches another's data)."""
    blob = json.dumps({"tenant": tenant, "demonstrations": demonstrations}, sort_keys=True, separators=(",", ":"))
    return PREFIX + hashlib.sha256(blob.encode()).hexdigest()


def split(tenant: str, task: dict[str, Any]) -> tuple[dict[str, Any], str, list[dict[str, Any]]]:
    """(the record's fields for a task, its demonstrations' key, the demonstrations): the record
    keeps the instruction and options (the API reads them) and the key, never the rows."""
    demos = task["demonstrations"]
    key = demos_key(tenant, demos)
    rest = {k: v for k, v in task.items() if k != "demonstrations"}
    return {"task": rest, "demos_key": key, "n_demos": len(demos)}, key, demos


def hold(s: Settings, key: str, task_id: str, demonstrations: list[dict[str, Any]]) -> None:
    """The task's reference to the value, stored unless it is there: before its record is written."""
    data = zlib.compress(json.dumps(demonstrations, separators=(",", ":")).encode())
    shared(s).hold(key, data, REFS + key, task_id)


def release(s: Settings, key: str, task_id: str) -> None:
    """Drop the task's reference; the value goes with the last one."""
    shared(s).release(key, REFS + key, task_id)


def load(s: Settings, key: str) -> list[dict[str, Any]]:
    data = shared(s).get(key)
    if data is None:
        raise DemosGone(f"the task's demonstrations ({key}) are gone from the service: post the task again")
    return json.loads(zlib.decompress(data))


def task_json(s: Settings, rec: dict[str, Any]) -> dict[str, Any]:
    """The record's task (model.task.Task as JSON) with its demonstrations, wherever they are kept."""
    key = rec.get("demos_key")
    return rec["task"] if key is None else {**rec["task"], "demonstrations": load(s, key)}
