"""Strict requests: JSON bodies in UTF-8 with numbers a double holds (no NaN, Infinity or 1e999),
and no query parameter the route does not take (a misspelt one would be ignored silently).

Python's json module takes NaN and Infinity, which JSON does not have; a number that slipped in
came back in the 422's echo of the input, and the response encoder refused it (a 500). A body
that is not valid JSON is not refused while it is read, which FastAPI does before it checks the
API key: it becomes a `BadJSON` value the body model rejects, after the key has been checked,
and the 422 handler (app/errors.py) says what is wrong with it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

from fastapi import HTTPException, Request, Response
from fastapi.dependencies.models import Dependant
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute


class BadJSON:
    """A body that is not valid JSON, and why."""

    def __init__(self, reason: str):
        self.reason = reason

    def __repr__(self) -> str:
        return f"BadJSON({self.reason!r})"


def _constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number (JSON has no NaN or Infinity)")


def _number(text: str) -> float | int:
    """A JSON number with a fraction or an exponent. JSON has one kind of number, and JSON Schema
    calls 3.0 an integer: an integral one is read as an int, so a strictly validated int field
    takes it as it takes 3 (a float field takes either; neither takes true)."""
    x = float(text)
    if not math.isfinite(x):
        raise ValueError(f"{text} is out of range (the largest number is about 1.8e308)")
    return int(x) if x.is_integer() else x


def loads(body: bytes) -> Any:
    """The body as JSON, refusing what JSON does not allow; ValueError says why."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"the body is not UTF-8 (byte {e.start})") from e
    return json.loads(text, parse_constant=_constant, parse_float=_number)


class StrictJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            larger = self.scope.get("state", {}).get("body_limit")
            if larger is not None and len(body) > larger.small and f'"{larger.field}"'.encode() not in body:
                # a route that takes a larger body for one field (app/limits.py BodyLimit) got a large one without it
                raise HTTPException(413, f"request body exceeds {larger.small} bytes ({larger.small_what})")
            try:
                self._json = loads(body)
            except ValueError as e:  # json.JSONDecodeError included
                self._json = BadJSON(str(e))
            except RecursionError:  # [[[[...]]]] deeper than the parser's stack: no request needs that
                self._json = BadJSON("arrays or objects nested too deeply")
        return self._json


def query_names(d: Dependant) -> set[str]:
    """The query parameters a route takes, its dependencies' included."""
    return {p.alias for p in d.query_params}.union(*(query_names(sub) for sub in d.dependencies))


class StrictRoute(APIRoute):
    """Every router's route class: its handler reads the body as StrictJSONRequest and refuses
    query parameters the route does not declare (422 naming them)."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()
        known = query_names(self.dependant)

        async def strict(request: Request) -> Response:
            unknown = sorted(set(request.query_params) - known)
            if unknown:
                takes = f"it takes {', '.join(sorted(known))}" if known else "it takes none"
                raise RequestValidationError([{"loc": ("query", name), "type": "unknown_parameter",
                                               "msg": f"{self.path} takes no query parameter {name!r}; {takes}"}
                                              for name in unknown])
            return await handler(StrictJSONRequest(request.scope, request.receive))

        return strict
