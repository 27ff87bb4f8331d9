"""Demonstrations uploaded to POST /tasks as a file: a JSONL or CSV body (the task's other fields as
query parameters), or a multipart form (a `demonstrations` file, a `task` JSON field). Rows are read
with the json and csv modules; a bad row is a 422 naming its line, too many rows a 413."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterator
from typing import Any

from fastapi import HTTPException, status
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from app.bodies import loads
from model.task import Example, Limits

JSONL = frozenset({"application/jsonl", "application/x-ndjson", "application/jsonlines"})
CSV = frozenset({"text/csv"})
MULTIPART = "multipart/form-data"
COLUMNS = ("input", "output", "options")
MAX_ERRORS = 20  # a file with many bad rows: the first ones are enough to fix it

Row = tuple[int, dict[str, Any]]  # (its line in the file, its fields)


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def is_upload(scope: dict[str, Any]) -> bool:
    """Whether the request's body is an upload (its content type), not JSON."""
    kind = media_type(dict(scope.get("headers") or []).get(b"content-type", b"").decode("latin-1"))
    return kind in JSONL or kind in CSV or kind == MULTIPART


def kind_of(content_type: str | None, filename: str | None = None) -> str | None:
    """"jsonl" or "csv" from a content type, else from a file name's suffix (a form's file part)."""
    kind = media_type(content_type)
    if kind in JSONL or kind in CSV:
        return "jsonl" if kind in JSONL else "csv"
    name = (filename or "").lower()
    return "jsonl" if name.endswith((".jsonl", ".ndjson")) else "csv" if name.endswith(".csv") else None


def _line(line: int, msg: str, kind: str, field: str | None = None) -> dict[str, Any]:
    return {"loc": ("body", f"line {line}", *((field,) if field else ())), "msg": f"line {line}: {msg}", "type": kind}


def _text(data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")  # a byte-order mark, as spreadsheets write, is not part of the header
    except UnicodeDecodeError as e:
        raise RequestValidationError([{"loc": ("body",), "msg": f"the upload is not UTF-8 (byte {e.start})",
                                       "type": "not_utf8"}]) from e


def _jsonl(text: str) -> Iterator[Row | dict[str, Any]]:
    for i, line in enumerate(text.split("\n"), 1):  # split("\n"), not splitlines(): line numbers as editors count them
        if not line.strip():
            continue
        try:
            obj = loads(line.encode())
        except (ValueError, RecursionError) as e:
            yield _line(i, f"not JSON: {e}", "json_invalid")
            continue
        if not isinstance(obj, dict):
            yield _line(i, f"not a JSON object with {', '.join(COLUMNS[:2])}", "not_an_object")
            continue
        yield i, obj


def _csv(text: str) -> Iterator[Row | dict[str, Any]]:
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = [h.strip() for h in next(reader, [])]
        extra = [h for h in header if h not in COLUMNS]
        if extra or len(set(header)) < len(header) or not {"input", "output"} <= set(header):
            why = f"unknown column {extra[0]!r}" if extra else "a column is named twice" \
                if len(set(header)) < len(header) else f"missing column {'input' if 'input' not in header else 'output'}"
            yield _line(1, f"{why}; the header names input, output and optionally options (a JSON array)", "bad_header")
            return
        start = reader.line_num + 1
        for cells in reader:
            line, start = start, reader.line_num + 1  # a quoted cell may span lines: a row is named by its first
            if not any(c.strip() for c in cells):
                continue
            if len(cells) > len(header):
                yield _line(line, f"{len(cells)} fields; the header has {len(header)}", "extra_fields")
                continue
            if len(cells) < len(header):
                yield _line(line, f"missing column {header[len(cells)]}", "missing_column", header[len(cells)])
                continue
            row: dict[str, Any] = dict(zip(header, cells))
            if "options" in row:
                row = _cell_options(line, row)
            yield line, row
    except csv.Error as e:
        yield _line(reader.line_num, f"not CSV: {e}", "csv_invalid")


def _cell_options(line: int, row: dict[str, Any]) -> dict[str, Any]:
    """A CSV row's own options: a JSON array in its cell; an empty cell is none."""
    cell = row.pop("options").strip()
    if not cell:
        return row
    try:
        opts = json.loads(cell)
    except ValueError:
        opts = None
    return {**row, "options": opts if isinstance(opts, list) else cell}  # not a list: Example says what is wrong


def _check(line: int, obj: dict[str, Any], options: list[str] | None, context: dict[str, Any], csv_file: bool
           ) -> list[dict[str, Any]] | dict[str, Any]:
    """The row as a demonstration (JSON), or its errors, each naming its line."""
    what = "column" if csv_file else "key"
    missing = [c for c in COLUMNS[:2] if c not in obj]
    if missing:
        return [_line(line, f"missing {what} {missing[0]}", "missing_column", missing[0])]
    unknown = [k for k in obj if k not in COLUMNS]
    if unknown:
        return [_line(line, f"unknown {what} {unknown[0]!r}; a row has input, output and optionally options",
                      "unknown_column", unknown[0])]
    try:
        ex = Example.model_validate(obj, context=context)
    except ValidationError as e:
        return [_line(line, f"{'.'.join(map(str, err['loc'])) or 'row'}: {err['msg']}", err["type"],
                      str(err["loc"][0]) if err["loc"] else None) for err in e.errors(include_url=False)]
    if ex.options is None and options is not None and ex.output not in options:
        return [_line(line, f"output {ex.output!r} is not one of the options {options}", "output_not_an_option", "output")]
    return ex.model_dump(exclude_none=True)


def demonstrations(data: bytes, kind: str, options: list[str] | None, limits: Limits,
                   count_tokens: Callable[[str], int]) -> list[dict[str, Any]]:
    """The upload's rows as demonstrations: 413 beyond limits.max_demonstrations, else a 422 naming
    each bad row's line (the first MAX_ERRORS of them)."""
    rows, errors = [], []
    for got in (_jsonl if kind == "jsonl" else _csv)(_text(data)):
        (errors if isinstance(got, dict) else rows).append(got)
        if len(errors) >= MAX_ERRORS:
            break
    if not errors and len(rows) > limits.max_demonstrations:  # before any token is counted
        raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, f"{len(rows)} demonstrations; the limit is "
                            f"{limits.max_demonstrations} (max_demonstrations)")
    if not errors and not rows:
        raise RequestValidationError([{"loc": ("body",), "msg": "the upload has no rows", "type": "no_demonstrations"}])
    context = {"limits": limits, "count_tokens": count_tokens}
    demos = []
    for line, obj in rows:
        if len(errors) >= MAX_ERRORS:
            break
        got = _check(line, obj, options, context, kind == "csv")
        (errors.extend if isinstance(got, list) else demos.append)(got)
    if errors:
        raise RequestValidationError(errors)
    return demos
