"""Strict JSON request bodies: UTF-8, and numbers a double holds (no NaN, Infinity or 1e999).

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

from fastapi import Request, Response
from fastapi.routing import APIRoute


class BadJSON:
    """A body that is not valid JSON, and why."""

    def __init__(self, reason: str):
        self.reason = reason

    def __repr__(self) -> str:
        return f"BadJSON({self.reason!r})"


def _constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number (JSON has no NaN or Infinity)")


def _number(text: str) -> float:
    x = float(text)
    if not math.isfinite(x):
        raise ValueError(f"{text} is out of range (the largest number is about 1.8e308)")
    return x


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
            try:
                self._json = loads(await self.body())
            except ValueError as e:  # json.JSONDecodeError included
                self._json = BadJSON(str(e))
        return self._json


class StrictJSONRoute(APIRoute):
    """Every router's route class: its handler reads the body as StrictJSONRequest."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def strict(request: Request) -> Response:
            return await handler(StrictJSONRequest(request.scope, request.receive))

        return strict
