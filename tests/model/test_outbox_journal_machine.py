"""The outbox journal against a reference model, including reopening after a crash (hypothesis)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

from datalakefs.outbox.journal import FileState, Intent, Journal

NAMES = st.sampled_from(["a", "b", "c.root", "d_1", "e-2"])
DATASETS = st.sampled_from(["ds1", "ds2"])
STATES = st.sampled_from([FileState.QUEUED, FileState.UPLOADING, FileState.FAILED])


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
        self.garbage: set[str] = set()  # spool files no row refers to any more

    def teardown(self) -> None:
        self.journal.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    @rule(target=uploads, name=NAMES, dataset=DATASETS, size=st.integers(0, 1 << 40),
          adler32=st.sampled_from(["00000001", "deadbeef"]), version=st.integers(0, 2))
    def commit(self, name: str, dataset: str, size: int, adler32: str, version: int) -> tuple[str, str]:
        key = ("user.x", name)
        spool = f"{name}.{version}.spool"
        (upload_id,) = self.journal.commit([Intent("user.x", dataset, name, spool, size, adler32)])
        previous = self.rows.get(key)
        if previous is not None:
            assert upload_id == previous["id"]  # a recommit updates the same intent
            if previous["spool"] != spool:
                self.garbage.add(str(previous["spool"]))  # the version it replaced
        self.rows[key] = {"id": upload_id, "dataset": dataset, "spool": spool, "size": size, "adler32": adler32,
                          "state": FileState.QUEUED, "error": ""}
        return key

    @rule(key=uploads, state=STATES, error=st.sampled_from(["", "boom"]))
    def set_state(self, key: tuple[str, str], state: FileState, error: str) -> None:
        row = self.rows.get(key)
        if row is None:
            return
        self.journal.set_state(int(str(row["id"])), state, error)
        row.update(state=state, error=error)

    @rule(key=uploads, name=NAMES, dataset=DATASETS)
    def rename(self, key: tuple[str, str], name: str, dataset: str) -> None:
        row = self.rows.get(key)
        new_key = ("user.x", name)
        if row is None or new_key == key:
            return
        self.journal.rename(int(str(row["id"])), dataset, name)
        replaced = self.rows.pop(new_key, None)
        if replaced is not None:
            self.garbage.add(str(replaced["spool"]))
        self.rows[new_key] = {**self.rows.pop(key), "dataset": dataset}

    @rule(key=consumes(uploads))
    def remove(self, key: tuple[str, str]) -> None:
        row = self.rows.pop(key, None)
        if row is not None:
            self.journal.remove([int(str(row["id"]))])
            self.garbage.add(str(row["spool"]))

    @rule()
    def collect_garbage(self) -> None:
        self.journal.forget_garbage(sorted(self.garbage))
        self.garbage.clear()

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
            if row["state"] is FileState.UPLOADING:
                row["state"] = FileState.QUEUED

    @invariant()
    def matches_model(self) -> None:
        found = {(r.scope, r.name): r for r in self.journal.uploads()}
        assert found.keys() == self.rows.keys()
        for key, record in found.items():
            row = self.rows[key]
            assert (record.id, record.dataset, record.spool, record.size, record.adler32, record.state,
                    record.error) == (row["id"], row["dataset"], row["spool"], row["size"], row["adler32"],
                                      row["state"], row["error"])
        assert set(self.journal.garbage()) == self.garbage
        assert set(self.journal.datasets()) == self.datasets


JournalMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=25, deadline=None)
TestJournal = JournalMachine.TestCase
