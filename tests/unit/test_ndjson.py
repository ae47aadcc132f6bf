"""Streamed JSON rows: the same rows as one ``json.loads`` per line, wherever the stream is cut; a bad
or cut row is an error naming it, never a shorter answer."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from datalakefs.catalogue.ndjson import batches
from datalakefs.errors import CatalogueUnavailableError

_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
_rows = st.lists(st.dictionaries(st.text(max_size=8), _values, max_size=4), max_size=20)


def rows(chunks: list[bytes], what: str) -> list[dict[str, Any]]:
    return [row for batch in batches(chunks, what) for row in batch]


def cut(body: bytes, at: list[int]) -> list[bytes]:
    points = sorted({0, len(body), *(p % (len(body) + 1) for p in at)})
    return [body[a:b] for a, b in itertools.pairwise(points)]


@given(_rows, st.lists(st.integers(min_value=0), max_size=10), st.booleans())
def test_rows_wherever_the_stream_is_cut(expected: list[dict[str, Any]], at: list[int], final_newline: bool) -> None:
    body = b"\n".join(json.dumps(row).encode() for row in expected)
    if final_newline and expected:
        body += b"\n"
    assert rows(cut(body, at), "listing") == expected
    assert all(batches(cut(body, at), "listing")), "no empty batch"


def test_blank_lines_are_skipped() -> None:
    assert list(batches([b'{"a": 1}\n\n  \n{"a"', b': 2}\n\n'], "listing")) == [[{"a": 1}], [{"a": 2}]]


@pytest.mark.parametrize(
    ("chunks", "problem"),
    [
        ([b'{"a": 1}\n{"a": 2}\n{"a": '], r"the listing: row 3 is not valid JSON \(the answer ends inside it\)"),
        ([b'{"a": 1}\n', b"Internal Server Error\n", b'{"a": 3}\n'], r"row 2 is not valid JSON: .*'Internal Server"),
        ([b'{"a": 1}\n42\n'], r"row 2 is not a JSON object: '42'"),
        ([b'{"a": 1}, {"a": 2}\n'], r"row 1 is not valid JSON"),
    ],
)
def test_a_bad_row_is_an_error_naming_it(chunks: list[bytes], problem: str) -> None:
    with pytest.raises(CatalogueUnavailableError, match=problem):
        rows(chunks, "the listing")
