"""Limits on what one request may cost: 413 for bodies over max_request_bytes, declared or streamed
(ASGI middleware), and the tokens a /predict call makes the worker score."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, NamedTuple

from app.errors import is_v1, openai_error
from model.task import Query


def predict_tokens(task: dict[str, Any], queries: list[Query], count_tokens: Callable[[str], int], max_new_tokens: int) -> int:
    """Tokens the worker scores for these queries of the task (a record's "task"): each input once
    per option (input + option), or input + max_new_tokens to generate. The demonstrations are
    encoded once per task and kept, so they do not count. 32 options of 256 tokens cost SmolLM2
    24 s of CPU per input; a limit on this bounds a call's worker time whatever its shape."""
    sizes: dict[str, int] = {}

    def n(text: str) -> int:
        if text not in sizes:
            sizes[text] = count_tokens(text)
        return sizes[text]

    total = 0
    for q in queries:
        options = q.options if q.options is not None else task.get("options")
        total += sum(n(q.input) + n(o) for o in options) if options else n(q.input) + max_new_tokens
    return total


class Larger(NamedTuple):
    """A route's own body limits: `bytes` in all (named `what`), and `small` (named `small_what`)
    for a body without `field` (POST /tasks: demonstrations up to max_upload_bytes, and an adapter
    zip, base64-encoded, beside them)."""

    bytes: int
    what: str
    field: str
    small: int
    small_what: str


class BodyLimit:
    """413 for a body over max_bytes, or over the limits given for a route: (method, path) -> Larger.
    A body of such a route over its small limit without its field is refused when it is read
    (app/bodies.py; an upload, app/uploads.py), from what this leaves in the request's state."""

    def __init__(self, app, max_bytes: int, larger: dict[tuple[str, str], Larger] | None = None):
        self.app = app
        self.max = max_bytes
        self.larger = larger or {}

    async def _reject(self, scope, send, limit: int, what: str) -> None:
        message = f"request body exceeds {limit} bytes ({what})"
        body = json.dumps(openai_error(413, message) if is_v1(scope["path"]) else {"detail": message}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        larger = self.larger.get((scope["method"], scope["path"].rstrip("/")))
        limit, what = (larger.bytes, larger.what) if larger else (self.max, "max_request_bytes")
        if larger is not None:
            scope.setdefault("state", {})["body_limit"] = larger
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:  # the server holds the body to its declared length
            if not length.isdigit() or int(length) > limit:
                return await self._reject(scope, send, limit, what)
            return await self.app(scope, receive, send)
        # Streamed without a length: read it here, at most max bytes, then hand it on.
        chunks, size, more = [], 0, True
        while more:
            msg = await receive()
            if msg["type"] != "http.request":
                return await self.app(scope, receive, send)  # client went away: let the app see it
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return await self._reject(scope, send, limit, what)
            more = msg.get("more_body", False)
        body = b"".join(chunks)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
