"""Error bodies and the 422 that names the field and the limit.

Two shapes: `{"detail": ...}` (FastAPI's) everywhere, and OpenAI's `{"error": {"message", "type",
"param", "code"}}` under /v1, where a bad parameter is a 400 as OpenAI answers it, so that the
`openai` package raises its own exceptions with the message. `respond` picks the shape by path.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from fastapi import HTTPException, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.bodies import BadJSON
from app.quotas import OverQuota
from app.schemas import Error, OpenAIError

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


V1_ERRORS = {status: {"model": OpenAIError, "description": d["description"]} for status, d in ERRORS.items()}
V1_ERRORS[400] = {"model": OpenAIError, "description": "a parameter is invalid or not supported (param names it)"}
V1_ERRORS[404] = {"model": OpenAIError, "description": "model is not a task of the caller"}
V1_ERRORS[409] = {"model": OpenAIError, "description": "the task is not ready (Retry-After), or failed"}
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "invalid_request_error",
          409: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error",
          429: "rate_limit_error"}
_CODES = {401: "invalid_api_key", 403: "permission_denied", 404: "not_found", 409: "conflict", 413: "request_too_large",
          429: "rate_limit_exceeded", 503: "service_unavailable"}


class ApiError(HTTPException):
    """An HTTP error that also names, for /v1 callers, the parameter at fault and OpenAI's error code."""

    def __init__(self, status_code: int, detail: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(status_code, detail, headers=headers)
        self.param, self.code = param, code


def is_v1(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


def openai_error(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error"),
                      "param": param, "code": code or _CODES.get(status)}}


def respond(request: Request, status: int, message: str, headers: dict[str, str] | None = None, *,
            param: str | None = None, code: str | None = None) -> JSONResponse:
    """An error answer in the caller's shape: OpenAI's under /v1, FastAPI's elsewhere."""
    body = openai_error(status, message, param, code) if is_v1(request.url.path) else {"detail": message}
    return JSONResponse(body, status_code=status, headers=headers)


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
        [{"loc": prefix + tuple(err["loc"]), "msg": err["msg"], "type": err["type"], "input": err.get("input")}
         for err in e.errors(include_url=False)]
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


def _v1_invalid(errors: list[dict[str, Any]]) -> JSONResponse:
    """A validation error as OpenAI answers it: 400, the first parameter at fault, every message."""
    def where(e):
        loc = [str(x) for x in e["loc"] if x not in ("body", "query", "header")]
        return ".".join(loc) or None

    def say(e):
        if e["type"] == "extra_forbidden":
            return f"{where(e)}: not supported by this service"
        if isinstance(e.get("input"), BadJSON):
            return f"the body is not valid JSON: {e['input'].reason}"
        return f"{where(e)}: {e['msg']}" if where(e) else e["msg"]

    first = errors[0]
    code = "unsupported_parameter" if first["type"] == "extra_forbidden" else "invalid_value"
    return JSONResponse(openai_error(400, "; ".join(dict.fromkeys(say(e) for e in errors)), where(first), code),
                        status_code=400)


async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 shape, with inputs cut to ECHO_CHARS; a body that is not JSON says why once."""
    errors = exc.errors()
    if is_v1(request.url.path):
        return _v1_invalid(errors)
    bad = next((e["input"] for e in errors if isinstance(e.get("input"), BadJSON)), None)
    if bad is not None:
        detail = [{"type": "json_invalid", "loc": ["body"], "msg": f"the body is not valid JSON: {bad.reason}"}]
    else:
        detail = [{**_finite(jsonable_encoder({k: v for k, v in e.items() if k != "input"})),
                   **({"input": echo(e["input"])} if "input" in e else {})} for e in errors]
    return JSONResponse({"detail": detail}, status_code=422)


async def over_quota(request: Request, exc: OverQuota) -> JSONResponse:
    headers = None if exc.retry_after_s is None else {"Retry-After": str(exc.retry_after_s)}
    return respond(request, exc.status, exc.detail, headers)


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
    if is_v1(request.url.path):
        return respond(request, exc.status_code, str(exc.detail), exc.headers, param=getattr(exc, "param", None),
                       code=getattr(exc, "code", None))
    return await http_exception_handler(request, exc)
