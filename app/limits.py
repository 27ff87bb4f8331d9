"""413 for request bodies over max_request_bytes, declared or streamed (ASGI middleware)."""

from __future__ import annotations

import json


class BodyLimit:
    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max = max_bytes

    async def _reject(self, send) -> None:
        body = json.dumps({"detail": f"request body exceeds {self.max} bytes"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:  # the server holds the body to its declared length
            if not length.isdigit() or int(length) > self.max:
                return await self._reject(send)
            return await self.app(scope, receive, send)
        # Streamed without a length: read it here, at most max bytes, then hand it on.
        chunks, size, more = [], 0, True
        while more:
            msg = await receive()
            if msg["type"] != "http.request":
                return await self.app(scope, receive, send)  # client went away: let the app see it
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            if size > self.max:
                return await self._reject(send)
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
