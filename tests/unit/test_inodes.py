"""The inode table: identity, lookup counting and forgetting."""

import tracemalloc

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from datalakefs.errors import NotFoundError
from datalakefs.model import DID, DIDInfo, DIDType
from datalakefs.namespace.inodes import ROOT_INODE, InodeTable, Node, NodeKind


def _file(table: InodeTable, did: DID) -> Node:
    """A file node is keyed by its DID (namespace/tree.py)."""
    return table.intern(did, NodeKind.FILE, ROOT_INODE, did=did)


def _directory(table: InodeTable, did: DID) -> Node:
    return table.intern(("dir", ROOT_INODE, did), NodeKind.COLLECTION, ROOT_INODE, did=did)


def test_same_key_same_inode() -> None:
    table = InodeTable()
    did = DID("s", "f")
    assert _file(table, did).ino == _file(table, did).ino
    assert _file(table, DID("s", "g")).ino != _file(table, did).ino


def test_a_known_node_is_replaced_only_to_add_missing_facts() -> None:
    table = InodeTable()
    did = DID("s", "f")
    info = DIDInfo(did, DIDType.FILE, size=3)
    first = table.intern(did, NodeKind.FILE, ROOT_INODE, did=did)
    informed = table.intern(did, NodeKind.FILE, ROOT_INODE, did, info)  # facts arrive
    assert (informed.ino, informed.info) == (first.ino, info) and not table.current(first)
    assert table.intern(did, NodeKind.FILE, ROOT_INODE, did=did) is informed  # kept; not rebuilt
    other = DIDInfo(did, DIDType.FILE, size=4)
    assert table.intern(did, NodeKind.FILE, ROOT_INODE, did, other) is informed  # known facts stay


def test_forget_drops_only_after_the_last_reference() -> None:
    table = InodeTable()
    node = _file(table, DID("s", "f"))
    table.remember(node.ino, 2)
    table.forget(node.ino, 1)
    assert table.get(node.ino) == node
    table.forget(node.ino, 1)
    with pytest.raises(NotFoundError):
        table.get(node.ino)
    assert _file(table, DID("s", "f")).ino != node.ino


def test_what_is_derived_from_a_node_lives_exactly_as_long_as_the_node() -> None:
    table = InodeTable()
    did = DID("s", "f")
    node = _file(table, did)
    assert table.current(node)
    table.keep_derived(node.ino, "attributes of a node without facts")
    assert table.derived(node.ino) == "attributes of a node without facts"
    informed = table.intern(did, NodeKind.FILE, ROOT_INODE, did, DIDInfo(did, DIDType.FILE, size=3))
    assert not table.current(node) and table.current(informed)
    assert table.derived(node.ino) is None  # replaced: what was derived from the old node is gone
    table.keep_derived(informed.ino, "attributes")
    table.remember(informed.ino)
    table.forget(informed.ino, 1)
    assert table.derived(informed.ino) is None
    table.keep_derived(informed.ino, "attributes of a forgotten node")  # too late: not kept
    assert table.derived(informed.ino) is None


def test_a_file_node_costs_the_table_no_entry_for_its_key() -> None:
    """Its DID is its key: 20,000 listed files (remembered by the kernel) cost the table their
    nodes, inode numbers and three dict entries each, about 220 bytes; a fourth (the key by inode) cost
    30 bytes more."""
    dids = [DID("s", f"file.{i:06d}") for i in range(20_000)]
    table = InodeTable()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for did in dids:
            table.remember(_file(table, did).ino)
        per_file = (tracemalloc.get_traced_memory()[0] - before) / len(dids)
    finally:
        tracemalloc.stop()
    assert per_file < 235
    for did in dids:  # and each is forgotten as any other node
        table.forget(_file(table, did).ino, 1)
    assert len(table) == 1


def test_root_is_never_forgotten() -> None:
    table = InodeTable()
    table.remember(ROOT_INODE)
    table.forget(ROOT_INODE, 10)
    assert table.get(ROOT_INODE).kind is NodeKind.ROOT


class InodeTableMachine(RuleBasedStateMachine):
    """Against a model: a node exists exactly while the kernel holds references to it."""

    def __init__(self) -> None:
        super().__init__()
        self.table = InodeTable()
        self.refs: dict[DID, int] = {}
        self.inos: dict[DID, int] = {}

    @rule(name=st.sampled_from("abcdef"), count=st.integers(1, 3))
    def look_up(self, name: str, count: int) -> None:
        did = DID("s", name)
        node = (_file if name < "d" else _directory)(self.table, did)
        if did in self.inos:
            assert node.ino == self.inos[did]
        self.inos[did] = node.ino
        self.table.remember(node.ino, count)
        self.refs[did] = self.refs.get(did, 0) + count

    @precondition(lambda self: bool(self.refs))
    @rule(data=st.data())
    def forget(self, data: st.DataObject) -> None:
        did = data.draw(st.sampled_from(sorted(self.refs)))
        count = data.draw(st.integers(1, self.refs[did]))
        self.table.forget(self.inos[did], count)
        self.refs[did] -= count
        if not self.refs[did]:
            del self.refs[did]
            del self.inos[did]

    @invariant()
    def known_nodes_match_references(self) -> None:
        assert len(self.table) == 1 + len(self.refs)
        for did, ino in self.inos.items():
            assert self.table.get(ino).did == did
            assert self.table.lookup_count(ino) == self.refs[did]


TestInodeTable = InodeTableMachine.TestCase
