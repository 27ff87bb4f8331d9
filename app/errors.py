"""Error bodies and the 422 that names the field and the limit."""

from __future__ import annotations

from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from app.schemas import Error

ERRORS = {
    401: {"model": Error, "description": "missing or unknown API key"},
    404: {"model": Error, "description": "no such task (or another tenant's)"},
    409: {"model": Error, "description": "the task is not ready"},
    413: {"model": Error, "description": "request body too large"},
    503: {"model": Error, "description": "the queue is down or no worker answered in time"},
}
ADMIN_ERRORS = {
    401: {"model": Error, "description": "missing or unknown API key"},
    403: {"model": Error, "description": "not the admin key"},
    404: {"model": Error, "description": "no such job or checkpoint"},
    409: {"model": Error, "description": "not in a state that allows this"},
    413: {"model": Error, "description": "request body too large"},
    503: {"model": Error, "description": "the queue is down"},
}


def invalid(loc: tuple, msg: str, kind: str) -> RequestValidationError:
    """A 422 in FastAPI's own shape, for checks the body model cannot make (limits from settings)."""
    return RequestValidationError([{"loc": loc, "msg": msg, "type": kind}])


def invalid_from(e: ValidationError, prefix: tuple) -> RequestValidationError:
    return RequestValidationError(
        [{"loc": prefix + tuple(err["loc"]), "msg": err["msg"], "type": err["type"]} for err in e.errors(include_url=False)]
    )
