"""Error bodies and the 422 that names the field and the limit."""

from __future__ import annotations

import json
import math
import re
from typing import Any

from fastapi import Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.bodies import BadJSON
from app.quotas import OverQuota
from app.schemas import Error

# A filesystem path of two or more parts: the server's folders (checkpoints, bank, data dir) are
# nobody else's business, and naming them helps only an attacker.
_PATH = re.compile(r"(?<![\w.~-])/(?:[^\s/'\"`:,;()<>]+/)+[^\s/'\"`:,;()<>]*")
ECHO_CHARS = 1000  # a 422 shows this much of the offending input: enough to find it, never the whole body back

def _error(description: str) -> dict:
    return {"model": Error, "description": description}


_AUTH, _SIZE = _error("missing or unknown API key"), _error("request body too large")
ERRORS = {
    401: _AUTH,
    404: _error("no such task (or another tenant's)"),
    409: _error("the task is not ready"),
    413: _SIZE,
    429: _error("over a per-tenant quota; retry after Retry-After seconds"),
    503: _error("the queue is down or no worker answered in time"),
}
ADMIN_ERRORS = {
    401: _AUTH,
    403: _error("not the admin key"),
    404: _error("no such job or checkpoint"),
    409: _error("not in a state that allows this"),
    413: _SIZE,
    503: _error("the queue is down"),
}


def public(message: str | None) -> str | None:
    """A message fit for a client: every server path in it replaced by a placeholder."""
    return message if message is None else _PATH.sub("<server path>", message)


def _leaves(x: Any, fn) -> Any:
    """fn applied to every value inside a JSON-like value (dicts and lists kept)."""
    if isinstance(x, dict):
        return {k: _leaves(v, fn) for k, v in x.items()}
    if isinstance(x, list):
        return [_leaves(v, fn) for v in x]
    return fn(x)


def public_values(x: Any) -> Any:
    """public() applied to every string in a JSON-like value (a checkpoint's meta names its data dir)."""
    return _leaves(x, lambda v: public(v) if isinstance(v, str) else v)


def invalid(loc: tuple, msg: str, kind: str) -> RequestValidationError:
    """A 422 in FastAPI's own shape, for checks the body model cannot make (limits from settings)."""
    return RequestValidationError([{"loc": loc, "msg": msg, "type": kind}])


def invalid_from(e: ValidationError, prefix: tuple) -> RequestValidationError:
    return RequestValidationError(
        [{"loc": prefix + tuple(err["loc"]), "msg": err["msg"], "type": err["type"]} for err in e.errors(include_url=False)]
    )


def _finite(x: Any) -> Any:
    """JSON-safe: a non-finite float becomes its name (the response encoder refuses NaN)."""
    return _leaves(x, lambda v: str(v) if isinstance(v, float) and not math.isfinite(v) else v)


def echo(x: Any) -> Any:
    """The input as a 422 shows it: itself when short, else its first ECHO_CHARS characters and its length."""
    if isinstance(x, (bytes, bytearray)):
        x = bytes(x).decode("utf-8", errors="replace")
    x = _finite(jsonable_encoder(x, custom_encoder={BadJSON: repr}))
    text = x if isinstance(x, str) else json.dumps(x)
    if len(text) <= ECHO_CHARS:
        return x
    return f"{text[:ECHO_CHARS]}... ({len(text)} characters in all)"


async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 shape, with inputs cut to ECHO_CHARS; a body that is not JSON says why once."""
    errors = exc.errors()
    bad = next((e["input"] for e in errors if isinstance(e.get("input"), BadJSON)), None)
    if bad is not None:
        detail = [{"type": "json_invalid", "loc": ["body"], "msg": f"the body is not valid JSON: {bad.reason}"}]
    else:
        detail = [{**_finite(jsonable_encoder({k: v for k, v in e.items() if k != "input"})),
                   **({"input": echo(e["input"])} if "input" in e else {})} for e in errors]
    return JSONResponse({"detail": detail}, status_code=422)


async def over_quota(request: Request, exc: OverQuota) -> JSONResponse:
    headers = None if exc.retry_after_s is None else {"Retry-After": str(exc.retry_after_s)}
    return JSONResponse({"detail": exc.detail}, status_code=429, headers=headers)


def _methods_by_path(app) -> list[tuple[re.Pattern, set[str]]]:
    """Each documented path as a regex, with the methods the OpenAPI schema gives it (HEAD with GET)."""
    table = []
    for template, item in app.openapi()["paths"].items():
        pattern = re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template))
        methods = {m.upper() for m in item if m in ("get", "put", "post", "delete", "patch", "options", "head")}
        table.append((re.compile(f"^{pattern}$"), methods | ({"HEAD"} if "GET" in methods else set())))
    return table


async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
    """FastAPI's answer to an HTTP error, except that a 405's Allow lists every documented method of
    the path: Starlette names only those of the first route that matched it (GET /tasks/{id} and
    DELETE /tasks/{id} are two routes)."""
    if exc.status_code == 405:
        state = request.app.state
        state.methods_by_path = getattr(state, "methods_by_path", None) or _methods_by_path(request.app)
        allowed = set().union(*(m for rx, m in state.methods_by_path if rx.match(request.url.path)))
        if allowed:
            exc.headers = {**(exc.headers or {}), "Allow": ", ".join(sorted(allowed))}
    return await http_exception_handler(request, exc)
