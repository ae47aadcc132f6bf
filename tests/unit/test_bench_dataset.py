"""How the dataset bench splits the files between parallel readers."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from bench.dataset import split


@given(st.lists(st.text(max_size=3), min_size=1, max_size=60), st.integers(min_value=1, max_value=20))
def test_split_keeps_every_item_in_order_in_nearly_equal_nonempty_slices(items: list[str], parts: int) -> None:
    slices = split(items, parts)
    assert [item for part in slices for item in part] == items
    assert len(slices) == min(parts, len(items))
    assert all(part for part in slices)
    assert max(map(len, slices)) - min(map(len, slices)) <= 1
