"""The outbox journal against a reference model, including reopening after a crash (hypothesis)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

from datalakefs.outbox.journal import Intent, Journal, State

NAMES = st.sampled_from(["a", "b", "c.root", "d_1", "e-2"])
DATASETS = st.sampled_from(["ds1", "ds2"])
STATES = st.sampled_from(list(State))


class JournalMachine(RuleBasedStateMachine):
    uploads = Bundle("uploads")

    def __init__(self) -> None:
        super().__init__()
        self.directory = Path(tempfile.mkdtemp(prefix="journal-"))
        self.path = self.directory / "journal.sqlite"
        self.journal = Journal(self.path)
        # model: (scope, name) → dict of the row's fields; ids as the journal assigned them
        self.rows: dict[tuple[str, str], dict[str, object]] = {}
        self.datasets: set[tuple[str, str]] = set()

    def teardown(self) -> None:
        self.journal.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    @rule(target=uploads, name=NAMES, dataset=DATASETS, size=st.integers(0, 1 << 40),
          adler32=st.none() | st.sampled_from(["00000001", "deadbeef"]))
    def commit(self, name: str, dataset: str, size: int, adler32: str | None) -> tuple[str, str]:
        key = ("user.x", name)
        (upload_id,) = self.journal.commit([Intent("user.x", dataset, name, f"{name}.spool", size, adler32)])
        previous = self.rows.get(key)
        if previous is not None:
            assert upload_id == previous["id"]  # a recommit updates the same intent
        self.rows[key] = {"id": upload_id, "dataset": dataset, "size": size, "adler32": adler32,
                          "state": State.QUEUED, "error": ""}
        return key

    @rule(key=uploads, state=STATES, error=st.sampled_from(["", "boom"]),
          adler32=st.none() | st.just("0badf00d"))
    def set_state(self, key: tuple[str, str], state: State, error: str, adler32: str | None) -> None:
        row = self.rows.get(key)
        if row is None:
            return
        self.journal.set_state(int(str(row["id"])), state, error, adler32)
        row.update(state=state, error=error)
        if adler32 is not None:
            row["adler32"] = adler32

    @rule(key=consumes(uploads))
    def finish(self, key: tuple[str, str]) -> None:
        row = self.rows.pop(key, None)
        if row is not None:
            self.journal.finish([int(str(row["id"]))])

    @rule(dataset=DATASETS, add=st.booleans())
    def dataset_change(self, dataset: str, add: bool) -> None:
        if add:
            self.journal.add_dataset("user.x", dataset)
            self.datasets.add(("user.x", dataset))
        else:
            self.journal.remove_dataset("user.x", dataset)
            self.datasets.discard(("user.x", dataset))

    @rule()
    def crash_and_reopen(self) -> None:
        """Reopening (after a kill) queues every upload that was in flight again."""
        self.journal.close()
        self.journal = Journal(self.path)
        for row in self.rows.values():
            if row["state"] is State.UPLOADING:
                row["state"] = State.QUEUED

    @invariant()
    def matches_model(self) -> None:
        found = {(r.scope, r.name): r for r in self.journal.uploads()}
        assert found.keys() == self.rows.keys()
        for key, record in found.items():
            row = self.rows[key]
            assert (record.id, record.dataset, record.size, record.adler32, record.state, record.error) == (
                row["id"], row["dataset"], row["size"], row["adler32"], row["state"], row["error"])
        assert set(self.journal.datasets()) == self.datasets


JournalMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=25, deadline=None)
TestJournal = JournalMachine.TestCase
