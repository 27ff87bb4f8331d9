"""Error bodies and the 422 that names the field and the limit."""

from __future__ import annotations

from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from app.schemas import Error

def _error(description: str) -> dict:
    return {"model": Error, "description": description}


_AUTH, _SIZE = _error("missing or unknown API key"), _error("request body too large")
ERRORS = {
    401: _AUTH,
    404: _error("no such task (or another tenant's)"),
    409: _error("the task is not ready"),
    413: _SIZE,
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


def invalid(loc: tuple, msg: str, kind: str) -> RequestValidationError:
    """A 422 in FastAPI's own shape, for checks the body model cannot make (limits from settings)."""
    return RequestValidationError([{"loc": loc, "msg": msg, "type": kind}])


def invalid_from(e: ValidationError, prefix: tuple) -> RequestValidationError:
    return RequestValidationError(
        [{"loc": prefix + tuple(err["loc"]), "msg": err["msg"], "type": err["type"]} for err in e.errors(include_url=False)]
    )
