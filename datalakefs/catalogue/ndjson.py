"""Rows of a streamed Rucio answer (``application/x-json-stream``: one JSON object per line).

rucio-clients parses such a stream line by line with ``json.loads(line, object_hook=...)``, the hook
running a regular expression over every string value of every row to find dates; a 100,000-row
listing spent about as long there as on the wire. Listings need no dates, so :func:`batches` parses the
stream itself (:func:`batches`): the complete lines of each received chunk are joined into one JSON array and parsed
by one ``json.loads`` call (twice as fast as one call per line), and each chunk's rows are handed out
as one batch as the stream arrives, so the body is never held whole and a listing can be served
while the rest of it is still on the wire.

A row that is not JSON, a row that is not an object, or a stream cut inside a row raises
:class:`~datalakefs.errors.CatalogueUnavailableError` naming the row's number: a caller that builds
its answer from the rows gets no answer rather than a wrong one.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

from datalakefs.errors import CatalogueUnavailableError


def batches(chunks: Iterable[bytes], what: str) -> Iterator[list[dict[str, Any]]]:
    """The JSON objects of a stream received in ``chunks`` (cut anywhere), a batch per chunk that
    completed rows (never an empty one); ``what`` names the stream in error messages."""
    tail = b""
    count = 0
    for chunk in chunks:
        lines = (tail + chunk).split(b"\n")
        tail = lines.pop()
        complete = [line for line in lines if line.strip()]
        if complete:
            yield _parsed(complete, count, what)
        count += len(complete)
    if tail.strip():
        yield _parsed([tail], count, what, last=True)


def _parsed(lines: list[bytes], before: int, what: str, last: bool = False) -> list[dict[str, Any]]:
    try:
        parsed = json.loads(b"[" + b",".join(lines) + b"]")
    except ValueError:
        parsed = []
    if len(parsed) != len(lines):  # a bad row, or a line holding more than one value: find which
        parsed = [_one(line, before + i, what, last) for i, line in enumerate(lines)]
    for i, row in enumerate(parsed):
        if not isinstance(row, dict):
            raise CatalogueUnavailableError(f"{what}: row {before + i + 1} is not a JSON object: {_excerpt(lines[i])}")
    return parsed  # type: ignore[no-any-return]


def _one(line: bytes, index: int, what: str, last: bool) -> Any:
    try:
        return json.loads(line)
    except ValueError as exc:
        cut = " (the answer ends inside it)" if last else ""
        raise CatalogueUnavailableError(
            f"{what}: row {index + 1} is not valid JSON{cut}: {exc}: {_excerpt(line)}"
        ) from None


def _excerpt(line: bytes, limit: int = 120) -> str:
    text = line.decode("utf-8", "replace")
    return repr(text if len(text) <= limit else text[:limit] + "...")
