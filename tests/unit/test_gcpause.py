"""The garbage collector's pause around bulk builds: counted over threads, restored as it was."""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator

import pytest

from datalakefs.gcpause import gc_paused


@pytest.fixture(autouse=True)
def collector_restored() -> Iterator[None]:
    enabled = gc.isenabled()
    yield
    if enabled:
        gc.enable()


def test_the_collector_runs_again_when_the_last_pause_ends_on_any_thread() -> None:
    gc.enable()
    inside, leave = threading.Event(), threading.Event()

    def build() -> None:
        with gc_paused:
            inside.set()
            leave.wait(10)

    worker = threading.Thread(target=build)
    worker.start()
    assert inside.wait(10) and not gc.isenabled()
    with gc_paused:
        leave.set()
        worker.join(10)
        assert not gc.isenabled()  # the worker's pause ended, this one has not
        with gc_paused:  # reentrant
            pass
        assert not gc.isenabled()
    assert gc.isenabled()


def test_a_collector_turned_off_before_stays_off() -> None:
    gc.disable()
    with gc_paused:
        assert not gc.isenabled()
    assert not gc.isenabled()


def test_an_error_inside_ends_the_pause() -> None:
    gc.enable()
    with pytest.raises(ValueError), gc_paused:
        raise ValueError("a bad row")
    assert gc.isenabled()
