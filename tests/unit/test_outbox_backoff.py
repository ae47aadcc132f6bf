"""The outbox's retry backoff on trio's MockClock: 1 s, doubling, capped at 5 minutes (SEMANTICS)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from datalakefs.catalogue.cached import CachedCatalogue
from datalakefs.catalogue.fake import FakeCatalogue
from datalakefs.config import Config
from datalakefs.errors import CatalogueUnavailableError
from datalakefs.outbox.journal import Journal
from datalakefs.outbox.service import Outbox
from tests.unit.test_outbox_service import FakeUploader, _write

FAILURES = 12


async def test_backoff_doubles_from_one_second_to_five_minutes(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    fake = FakeCatalogue()
    fake.add_scope("user.x")
    uploader = FakeUploader()
    uploader.failures.extend([CatalogueUnavailableError("quota exceeded")] * FAILURES)
    outbox = Outbox(Journal(tmp_path / "journal.sqlite"), uploader, CachedCatalogue(fake, Config()),
                    tmp_path / "spool", concurrency=2)
    file = await _write(outbox, "z.dat", b"x")
    delays: list[float] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(outbox.run)
        seen = file.next_try
        while len(delays) < FAILURES:
            if file.next_try != seen:  # an attempt failed and its next try is set: wait until then
                seen = file.next_try
                delays.append(seen - trio.current_time())
                await trio.sleep_until(seen)
            else:  # the attempt runs in worker threads, which the clock does not wait for
                await trio.sleep(0.001)
        nursery.cancel_scope.cancel()
    assert delays == pytest.approx([1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300], abs=0.01)
    assert file.describe() == f"queued (attempt {FAILURES + 1} after: quota exceeded)"
