"""A Python client of the mamlserve HTTP API (httpx), the one the `mamlserve` command uses.

    from mamlserve.client import Client
    with Client("http://127.0.0.1:8000", api_key="dev-key") as c:
        task = c.create_task([{"input": "great film", "output": "positive"},
                              {"input": "dull plot", "output": "negative"}], options=["positive", "negative"])
        c.wait(task["id"])
        for p in c.predict_all(task["id"], ["I loved it", "so boring"]):
            print(p["input"], p["output"])

Errors are `MamlserveError` (status and the service's message). A 429 or 503 with Retry-After is
retried after that long (up to `max_wait_s` each time), as is a connection refused while the
service starts; everything else is raised at once.
"""

from __future__ import annotations

import base64
import csv
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"


class MamlserveError(Exception):
    """The service said no: `status` (0 when it could not be reached) and its message."""

    def __init__(self, status: int, message: str):
        super().__init__(f"{status}: {message}" if status else message)
        self.status, self.message = status, message


def _message(r: httpx.Response) -> str:
    try:
        body = r.json()
    except ValueError:
        return r.text[:500]
    if isinstance(body, dict) and isinstance(body.get("error"), dict):  # /v1
        return body["error"].get("message", "")
    detail = body.get("detail", body) if isinstance(body, dict) else body
    if isinstance(detail, list):  # 422: where and what
        return "; ".join(f"{'.'.join(str(x) for x in e.get('loc', []))}: {e.get('msg')}" for e in detail)
    return str(detail)


def _events(lines: Iterable[str]) -> Iterator[tuple[str, str]]:
    """(event, data) of a server-sent event stream."""
    name, data = "message", []
    for line in lines:
        if not line:
            if data:
                yield name, "\n".join(data)
            name, data = "message", []
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())
    if data:
        yield name, "\n".join(data)


class Client:
    def __init__(self, url: str | None = None, api_key: str | None = None, timeout_s: float = 120.0,
                 retries: int = 5, max_wait_s: float = 30.0, transport: httpx.BaseTransport | None = None):
        """url: MAMLSERVE_URL or http://127.0.0.1:8000; api_key: MAMLSERVE_API_KEY."""
        key = api_key or os.environ.get("MAMLSERVE_API_KEY")
        if not key:
            raise MamlserveError(0, "no API key: pass api_key or set MAMLSERVE_API_KEY")
        self.http = httpx.Client(base_url=url or os.environ.get("MAMLSERVE_URL", DEFAULT_URL),
                                 headers={"Authorization": f"Bearer {key}"}, timeout=timeout_s, transport=transport)
        self.retries, self.max_wait_s = retries, max_wait_s

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- plumbing
    def _request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        for attempt in range(self.retries + 1):
            try:
                r = self.http.request(method, path, **kw)
            except httpx.ConnectError as e:
                if attempt == self.retries:
                    raise MamlserveError(0, f"cannot reach the service at {self.http.base_url}: {e}") from e
                time.sleep(min(2 ** attempt, self.max_wait_s))
                continue
            wait = r.headers.get("retry-after")
            if r.status_code in (429, 503) and wait and attempt < self.retries and float(wait) <= self.max_wait_s:
                time.sleep(float(wait))
                continue
            if r.status_code >= 400:
                raise MamlserveError(r.status_code, _message(r))
            return r
        raise AssertionError("unreachable")

    def _json(self, method: str, path: str, **kw: Any) -> Any:
        return self._request(method, path, **kw).json()

    # --- tasks
    def create_task(self, demonstrations: list[dict[str, Any]], options: list[str] | None = None,
                    instruction: str | None = None, adaptation: dict[str, Any] | None = None,
                    checkpoint: str | None = None, idempotency_key: str | None = None) -> dict[str, Any]:
        """The task (queued to adapt, or the existing one with the same content)."""
        body = {"demonstrations": demonstrations, "options": options, "instruction": instruction,
                "adaptation": adaptation, "checkpoint": checkpoint}
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._json("POST", "/tasks", json={k: v for k, v in body.items() if v is not None}, headers=headers)

    def upload_task(self, demonstrations: bytes | str | Path, kind: str = "csv", options: list[str] | None = None,
                    instruction: str | None = None, adaptation: dict[str, Any] | None = None,
                    checkpoint: str | None = None, idempotency_key: str | None = None) -> dict[str, Any]:
        """The task from a CSV (header input,output[,options]) or JSONL file sent as it is (POST /tasks
        as text/csv or application/jsonl, the other fields as query parameters): the service's
        errors name the file's lines, and the same rows make the same task as create_task."""
        data = demonstrations if isinstance(demonstrations, bytes) else Path(demonstrations).read_bytes()
        params = {"options": options, "instruction": instruction, "checkpoint": checkpoint, **(adaptation or {})}
        headers = {"content-type": "application/jsonl" if kind == "jsonl" else "text/csv"}
        if idempotency_key:
            headers["Idempotency-Key"] = idempotency_key
        return self._json("POST", "/tasks", content=data, headers=headers,
                          params={k: v for k, v in params.items() if v is not None})

    def import_adapter(self, adapter: bytes | str | Path, demonstrations: list[dict[str, Any]],
                       options: list[str] | None = None, instruction: str | None = None) -> dict[str, Any]:
        """A task served with a PEFT adapter zip (bytes or a path) made elsewhere: ready at once."""
        data = adapter if isinstance(adapter, bytes) else Path(adapter).read_bytes()
        body = {"demonstrations": demonstrations, "options": options, "instruction": instruction,
                "adapter": base64.b64encode(data).decode()}
        return self._json("POST", "/tasks", json={k: v for k, v in body.items() if v is not None})

    def get_task(self, task_id: str) -> dict[str, Any]:
        return self._json("GET", f"/tasks/{task_id}")

    def list_tasks(self, status: list[str] | None = None, offset: int = 0, limit: int = 100) -> dict[str, Any]:
        """A page: items, total, next_offset."""
        return self._json("GET", "/tasks", params={"offset": offset, "limit": limit, **({"status": status} if status else {})})

    def iter_tasks(self, status: list[str] | None = None) -> Iterator[dict[str, Any]]:
        offset: int | None = 0
        while offset is not None:
            page = self.list_tasks(status, offset)
            yield from page["items"]
            offset = page["next_offset"]

    def delete_task(self, task_id: str) -> None:
        self._request("DELETE", f"/tasks/{task_id}")

    def events(self, task_id: str, timeout_s: float = 3600) -> Iterator[dict[str, Any]]:
        """The task as it changes (status, progress), until it is ready, failed or deleted."""
        with self.http.stream("GET", f"/tasks/{task_id}/events", params={"timeout_s": timeout_s},
                              timeout=httpx.Timeout(self.http.timeout.connect, read=60)) as r:
            if r.status_code >= 400:
                r.read()
                raise MamlserveError(r.status_code, _message(r))
            for name, data in _events(r.iter_lines()):
                if name == "deleted":
                    raise MamlserveError(404, f"task {task_id} was deleted")
                if name == "status":
                    yield json.loads(data)

    def wait(self, task_id: str, timeout_s: float = 3600,
             on_change: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """The task once it is ready (events, no polling); MamlserveError when it failed or time ran out."""
        deadline = time.monotonic() + timeout_s
        task = self.get_task(task_id)
        while task["status"] in ("queued", "adapting"):
            left = deadline - time.monotonic()
            if left <= 0:
                raise MamlserveError(0, f"task {task_id} is still {task['status']} after {timeout_s:g} s")
            for task in self.events(task_id, timeout_s=min(left, 3600)):
                if on_change:
                    on_change(task)
        if task["status"] == "failed":
            raise MamlserveError(409, f"task {task_id} failed: {task.get('error')}")
        return task

    def predict(self, task_id: str, inputs: list[str | dict[str, Any]], wait_s: float = 0) -> dict[str, Any]:
        """One /predict call: predictions (output, scores per option) and usage."""
        return self._json("POST", "/predict", json={"task_id": task_id, "inputs": inputs, "wait_s": wait_s})

    def predict_all(self, task_id: str, inputs: Iterable[str | dict[str, Any]], batch: int = 32,
                    wait_s: float = 60) -> Iterator[dict[str, Any]]:
        """Predictions for any number of inputs, `batch` per call, yielded as each call returns."""
        chunk: list[str | dict[str, Any]] = []
        for x in inputs:
            chunk.append(x)
            if len(chunk) == batch:
                yield from self.predict(task_id, chunk, wait_s)["predictions"]
                chunk = []
        if chunk:
            yield from self.predict(task_id, chunk, wait_s)["predictions"]

    def download_adapter(self, task_id: str, path: str | Path, format: str = "auto") -> str:
        """Write the task's export (a zip) to path; returns its kind: lora or full."""
        with self.http.stream("GET", f"/tasks/{task_id}/adapter", params={"format": format}) as r:
            if r.status_code >= 400:
                r.read()
                raise MamlserveError(r.status_code, _message(r))
            with open(path, "wb") as f:
                for part in r.iter_bytes():
                    f.write(part)
            return r.headers.get("x-mamlserve-export", "lora")

    # --- the caller's account
    def usage(self) -> dict[str, Any]:
        return self._json("GET", "/usage")

    def models(self) -> list[str]:
        """Ready tasks, as /v1/models lists them."""
        return [m["id"] for m in self._json("GET", "/v1/models")["data"]]

    # --- admin (the admin key)
    def list_jobs(self, state: list[str] | None = None, offset: int = 0, limit: int = 100) -> dict[str, Any]:
        return self._json("GET", "/admin/jobs", params={"offset": offset, "limit": limit, **({"state": state} if state else {})})


def upload_kind(path: Path) -> str | None:
    """"csv" or "jsonl" when the file is in the service's own upload format (a header of input, output
    and optionally options; objects with those keys), so that it goes as it is and the service's
    errors name its lines; None for other column names, sent as JSON after reading them here."""
    allowed = {"input", "output", "options"}
    with open(path, newline="", encoding="utf-8-sig") as f:
        if path.suffix.lower() == ".csv":
            header = {h.strip() for h in next(csv.reader(f), [])}
            return "csv" if {"input", "output"} <= header <= allowed else None
        rows = [json.loads(line) for line in f if line.strip()]  # read_examples checked they are JSON objects
        return "jsonl" if all(r.keys() <= allowed for r in rows) else None
