"""Fixtures shared by the transport's unit tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from datalakefs.transport.aio_bridge import AioBridge


@pytest.fixture
def bridge() -> Iterator[AioBridge]:
    """A running bridge (its loop thread and HTTP session), closed after the test."""
    with AioBridge() as started:
        yield started
