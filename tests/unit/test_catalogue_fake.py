"""The in-memory catalogue keeps the Catalogue contract the Rucio adapter keeps."""

from __future__ import annotations

import threading

import pytest

from datalakefs.catalogue.base import Catalogue
from datalakefs.catalogue.fake import EPOCH, FakeCatalogue
from datalakefs.errors import CatalogueUnavailableError, InvalidNameError, NotFoundError
from datalakefs.model import DID, DIDType, Replica


def small_lake() -> FakeCatalogue:
    fake = FakeCatalogue()
    fake.add_container("data:all")
    fake.add_dataset("data:run1")
    fake.add_dataset("mc:sim")
    fake.add_file("data:f1", 10, adler32="0000000a", md5="m1")
    fake.add_file("data:f2", 32)
    fake.add_file("mc:g1", 5)
    fake.attach("data:all", "data:run1", "mc:sim")
    fake.attach("data:run1", "data:f1", "data:f2", "mc:g1")
    fake.add_replica("data:f1", "SITE-A", "http://a/f1")
    fake.add_replica("data:f1", "SITE-B", "root://b//f1")
    fake.set_metadata("data:run1", "run_number", 350001)
    fake.set_metadata("data:f1", "run_number", 350001)
    fake.set_metadata("data:f2", "run_number", 9)
    fake.set_metadata("data:f2", "datatype", "RAW")
    return fake


def test_it_is_a_catalogue() -> None:
    catalogue: Catalogue = FakeCatalogue()
    assert catalogue.list_scopes() == []


def test_scopes_and_collections() -> None:
    fake = small_lake()
    assert fake.list_scopes() == ["data", "mc"]
    assert [i.did.name for i in fake.list_collections("data")] == ["all", "run1"]
    with pytest.raises(NotFoundError):
        fake.list_collections("nope")


def test_content_has_sizes_and_checksums_but_no_times() -> None:
    fake = small_lake()
    [content] = fake.list_content(DID("data", "run1"))
    assert [str(i.did) for i in content] == ["data:f1", "data:f2", "mc:g1"]
    first = content[0]
    assert (first.type, first.size, first.adler32, first.md5) == (DIDType.FILE, 10, "0000000a", "m1")
    assert first.created_at == 0.0
    assert fake.get_info(DID("data", "run1")).size == 47  # a dataset's bytes are its files' sum
    assert list(fake.list_content(DID("data", "f1"))) == []  # a file has no content, like in rucio
    with pytest.raises(NotFoundError):
        list(fake.list_content(DID("data", "missing")))


def test_infos_have_times_and_leave_unknown_out() -> None:
    fake = small_lake()
    info = fake.get_info(DID("data", "f1"))
    assert info.created_at >= EPOCH
    infos = fake.get_infos([DID("data", "f2"), DID("data", "nope"), DID("data", "f1"), DID("data", "f2")])
    assert [str(i.did) for i in infos] == ["data:f2", "data:f1"]
    with pytest.raises(NotFoundError):
        fake.get_info(DID("data", "nope"))


def test_metadata_holds_columns_and_custom_keys() -> None:
    meta = small_lake().get_metadata(DID("data", "f2"))
    assert meta["did_type"] == "FILE"
    assert meta["bytes"] == "32"
    assert meta["datatype"] == "RAW"
    assert "adler32" not in meta  # unset keys are left out


def test_replicas_in_order_files_only() -> None:
    fake = small_lake()
    replicas = fake.list_replicas([DID("data", "f1"), DID("data", "f2"), DID("data", "run1"), DID("x", "y")])
    assert [str(r.info.did) for r in replicas] == ["data:f1", "data:f2"]
    assert replicas[0].replicas == (Replica("SITE-A", "http://a/f1"), Replica("SITE-B", "root://b//f1"))
    assert replicas[1].replicas == ()


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ("f*", ["data:f1", "data:f2"]),
        ("run_number>=350000", ["data:run1", "data:f1"]),
        ("run_number>=350000,type=file", ["data:f1"]),
        ("run_number<10;datatype=RAW", ["data:f2"]),
        ("run_number!=9", ["data:run1", "data:f1"]),
        ("name=r*", ["data:run1"]),
        ("datatype=raw", []),
    ],
)
def test_query(filters: str, expected: list[str]) -> None:
    assert [str(i.did) for i in small_lake().query("data", filters)] == expected


@pytest.mark.parametrize("filters", ["", "run_number>=", "type=bogus"])
def test_bad_query(filters: str) -> None:
    with pytest.raises(InvalidNameError):
        small_lake().query("data", filters)


def test_building_mistakes_are_refused() -> None:
    fake = small_lake()
    with pytest.raises(InvalidNameError):
        fake.add_file("data:f1")
    with pytest.raises(InvalidNameError):
        fake.attach("data:f1", "data:f2")
    with pytest.raises(NotFoundError):
        fake.attach("data:run1", "data:ghost")


def test_failures_and_call_counts() -> None:
    fake = small_lake()
    fake.fail(CatalogueUnavailableError("rucio down"), methods=["get_info"])
    with pytest.raises(CatalogueUnavailableError, match="rucio down"):
        fake.get_info(DID("data", "f1"))
    assert fake.list_scopes()  # other methods still answer
    fake.fail(CatalogueUnavailableError("all down"))
    with pytest.raises(CatalogueUnavailableError):
        fake.list_scopes()
    fake.fail(None)
    assert fake.get_info(DID("data", "f1")).size == 10
    assert fake.calls["get_info"] == 2
    assert fake.calls["list_scopes"] == 2


def test_pause_blocks_calls_until_resumed() -> None:
    fake = small_lake()
    fake.pause()
    answers: list[list[str]] = []
    worker = threading.Thread(target=lambda: answers.append(fake.list_scopes()))
    worker.start()
    worker.join(0.2)
    assert worker.is_alive()
    assert fake.calls["list_scopes"] == 1  # counted on entry
    fake.resume()
    worker.join(5)
    assert answers == [["data", "mc"]]
