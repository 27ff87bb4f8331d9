"""The checkpoint registry read without torch: which checkpoints exist and each one's meta.json, as
the API lists and checks them. model/checkpoints.py (which re-exports these) writes checkpoints and
loads their tensors."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from model.blobs import Blobs, blobs_at

META = "meta.json"
_ID = re.compile(r"^v(\d{4,})-[A-Za-z0-9_.-]+$")


class CheckpointError(ValueError):
    """No such checkpoint, a damaged one, or one made for another base model."""


def _meta_key(ckpt_id: str) -> str:
    if not _ID.match(ckpt_id):  # ids come from HTTP requests: never let one walk out of the registry
        raise CheckpointError(f"not a checkpoint id: {ckpt_id!r}")
    return f"{ckpt_id}/{META}"


def registry(where: Path | Blobs) -> Blobs:
    return blobs_at(where).under("checkpoints")


def ids(where: Path | Blobs) -> list[str]:
    """Every allocated id (complete or not), oldest version first."""
    found = {k.split("/", 1)[0] for k in registry(where).keys()}
    return sorted((i for i in found if _ID.match(i)), key=lambda i: int(_ID.match(i).group(1)))


def read_meta(where: Path | Blobs, ckpt_id: str) -> dict[str, Any]:
    reg = registry(where)
    raw = reg.get(_meta_key(ckpt_id))
    if raw is None:
        raise CheckpointError(f"no checkpoint {ckpt_id!r} in {reg.where}")
    return json.loads(raw)


def list_checkpoints(where: Path | Blobs) -> list[dict[str, Any]]:
    """Every complete checkpoint's meta, oldest version first (one without a readable meta.json is skipped)."""
    reg = registry(where)
    metas = [reg.get(_meta_key(i)) for i in ids(where)]
    return [m for m in (_json_or_none(raw) for raw in metas if raw is not None) if m is not None]


def _json_or_none(raw: bytes) -> dict[str, Any] | None:
    try:
        return json.loads(raw)
    except ValueError:  # a damaged meta.json: not listed rather than breaking the listing
        return None


def inner_lr(meta: Mapping[str, Any], space: str) -> float | None:
    """The lr a checkpoint was meta-trained to be adapted with, when adapting in its own space:
    a meta-learned initialisation is tuned to that step size, and the default one can undo it."""
    lr = meta.get("hyperparameters", {}).get("inner_lr")
    return float(lr) if lr and meta.get("space") == space else None
