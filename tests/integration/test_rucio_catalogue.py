"""The Rucio adapter against the real local data lake (the session ``lake`` fixture).

Only the seed's roles name DIDs here. Timings of the big calls are printed (``pytest -s``) and
bounded loosely, so a slow machine does not fail them but a pathological regression does.
"""

from __future__ import annotations

import configparser
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from datalakefs.cache.layout import FileKey
from datalakefs.catalogue.rucio import RucioCatalogue
from datalakefs.config import Config
from datalakefs.errors import AccessDeniedError, InvalidNameError, NotFoundError
from datalakefs.model import DID, DIDInfo, DIDType

pytestmark = pytest.mark.lake


def whole(batches: Iterator[list[DIDInfo]]) -> list[DIDInfo]:
    """Every row of a listing's batches, in order."""
    return [info for batch in batches for info in batch]


def did(text: str) -> DID:
    return DID.parse(text)


@pytest.fixture
def seed(lake: Any) -> Any:
    return lake.seed


@pytest.fixture
def catalogue(lake: Any) -> Iterator[RucioCatalogue]:
    adapter = RucioCatalogue(Config(rucio_config=str(lake.rucio_config)))
    yield adapter
    adapter.close()


def test_scopes(catalogue: RucioCatalogue, seed: Any) -> None:
    scopes = catalogue.list_scopes()
    assert set(seed.scopes) <= set(scopes)
    assert scopes == sorted(scopes)


def test_collections_of_a_scope(catalogue: RucioCatalogue, seed: Any) -> None:
    container, dataset = did(seed.container), did(seed.sized_dataset)
    listed = {info.did: info.type for info in catalogue.list_collections(container.scope)}
    assert listed[container] is DIDType.CONTAINER
    assert listed[dataset] is DIDType.DATASET
    assert all(d.scope == container.scope for d in listed)
    assert all(kind.is_collection for kind in listed.values())


def test_container_content_crosses_scopes(catalogue: RucioCatalogue, seed: Any) -> None:
    content = whole(catalogue.list_content(did(seed.container)))
    assert {info.did for info in content} == {did(c) for c in seed.container_children}
    assert all(info.type.is_collection for info in content)
    cross = whole(catalogue.list_content(did(seed.cross_scope_dataset)))
    assert cross
    assert all(info.did.scope != did(seed.cross_scope_dataset).scope for info in cross)


def test_dataset_content_has_sizes_and_checksums(catalogue: RucioCatalogue, seed: Any) -> None:
    content = {info.did: info for info in whole(catalogue.list_content(did(seed.sized_dataset)))}
    assert set(content) == {did(d) for d in seed.sized_files.values()}
    for size, name in seed.sized_files.items():
        info = content[did(name)]
        assert (info.type, info.size) == (DIDType.FILE, size)
        assert info.adler32 is not None
        assert len(info.adler32) == 8
        assert info.md5 is not None
    assert {i.did: i for i in whole(catalogue.list_files(did(seed.sized_dataset)))} == {
        d: replace(i, md5=None) for d, i in content.items()}  # list_files gives no md5


def test_a_listed_file_with_md5_only_has_the_cache_key_of_the_file_looked_up_alone(
    catalogue: RucioCatalogue, seed: Any, rucio_client: Any
) -> None:
    """The server's ``list_files`` has no md5 column: a file registered with md5 only is listed
    without any checksum unless the adapter asks for it."""
    dataset = DID(seed.upload_scope, f"md5_only_{uuid.uuid4().hex[:10]}")
    file = DID(dataset.scope, f"{dataset.name}.bin")
    rucio_client.add_dataset(dataset.scope, dataset.name)
    rucio_client.add_replicas(seed.scratch_rse, [
        {"scope": file.scope, "name": file.name, "bytes": 3, "md5": "0123456789abcdef0123456789abcdef"}])
    rucio_client.attach_dids(dataset.scope, dataset.name, [{"scope": file.scope, "name": file.name}])
    [listed] = whole(catalogue.list_files(dataset))
    alone = catalogue.get_info(file)
    assert (listed.adler32, listed.md5) == (None, "0123456789abcdef0123456789abcdef")
    assert FileKey.of(listed) == FileKey.of(alone)


def test_escaped_names_are_listed_alike_by_content_and_files(catalogue: RucioCatalogue, seed: Any) -> None:
    dataset = did(seed.escaped_dataset)
    content = whole(catalogue.list_content(dataset))
    assert set(whole(catalogue.list_files(dataset))) == {replace(i, md5=None) for i in content}
    assert {did(n) for n in seed.escaped_names} <= {info.did for info in whole(catalogue.list_files(dataset))}


def test_facts_of_one_did(catalogue: RucioCatalogue, seed: Any) -> None:
    big = catalogue.get_info(did(seed.big_file))
    assert big.type is DIDType.FILE
    assert big.size == max(seed.sized_files)
    assert big.adler32 is not None
    assert big.created_at > 1e9
    assert big.updated_at >= big.created_at
    assert catalogue.get_info(did(seed.container)).type is DIDType.CONTAINER


def test_names_that_are_not_file_names(catalogue: RucioCatalogue, seed: Any) -> None:
    names = {did(n) for n in seed.escaped_names}
    assert names <= {info.did for info in whole(catalogue.list_content(did(seed.escaped_dataset)))}
    for name in sorted(names):
        assert catalogue.get_info(name).did == name
    assert catalogue.get_info(did(seed.long_name)).did == did(seed.long_name)


def test_unknown_dids_and_scopes(catalogue: RucioCatalogue, seed: Any) -> None:
    existing = did(seed.big_file)
    missing = DID(existing.scope, existing.name + ".does-not-exist")
    with pytest.raises(NotFoundError):
        catalogue.get_info(missing)
    with pytest.raises(NotFoundError):
        whole(catalogue.list_content(missing))
    with pytest.raises(NotFoundError):
        whole(catalogue.list_files(missing))
    with pytest.raises(NotFoundError):
        catalogue.list_collections("no-such-scope")
    assert catalogue.get_infos([missing, existing])[0].did == existing


def test_metadata(catalogue: RucioCatalogue, seed: Any) -> None:
    meta = catalogue.get_metadata(did(seed.metadata_dataset.did))
    for key, value in seed.metadata_dataset.metadata.items():
        assert meta[key] == str(value)
    assert meta["did_type"] == "DATASET"


def test_metadata_query(catalogue: RucioCatalogue, seed: Any) -> None:
    query = seed.metadata_query
    found = {info.did for info in catalogue.query(query.scope, query.filter)}
    assert found == {did(d) for d in query.expected}


def test_wildcard_query(catalogue: RucioCatalogue, seed: Any) -> None:
    dataset = did(seed.metadata_dataset.did)
    found = catalogue.query(dataset.scope, f"{dataset.name}*")
    assert dataset in {info.did for info in found}
    assert all(info.did.name.startswith(dataset.name) for info in found)


def test_bad_filter_is_invalid(catalogue: RucioCatalogue, seed: Any) -> None:
    with pytest.raises(InvalidNameError):
        catalogue.query(seed.metadata_query.scope, "run_number>=1,run_number>=2")


def test_replicas_with_configured_schemes(lake: Any, seed: Any) -> None:
    files = [did(d) for d in seed.sized_files.values()]
    for schemes in (("http",), ("root",)):
        adapter = RucioCatalogue(Config(rucio_config=str(lake.rucio_config), read_schemes=schemes))
        try:
            answers = adapter.list_replicas(files)
        finally:
            adapter.close()
        assert {a.info.did for a in answers} == set(files)
        for answer in answers:
            assert answer.info.adler32 is not None
            assert answer.replicas, f"{answer.info.did} has no replica"
            assert {r.rse for r in answer.replicas} == {seed.origin_rse}
            assert all(r.pfn.startswith(f"{schemes[0]}://") for r in answer.replicas)


def test_replicas_through_rucios_proxy_for_the_client_site(lake: Any, seed: Any) -> None:
    config = Config(
        rucio_config=str(lake.rucio_config), read_schemes=("root",), client_site=seed.proxy_client_site
    )
    adapter = RucioCatalogue(config)
    try:
        [answer] = adapter.list_replicas([did(seed.big_file)])
    finally:
        adapter.close()
    [replica] = answer.replicas
    assert replica.pfn.startswith("root://")
    assert "//root://" in replica.pfn  # root://<proxy>//root://<origin>//<path>


def test_ten_thousand_files(catalogue: RucioCatalogue, seed: Any) -> None:
    dataset = did(seed.dataset_10k)
    content = whole(catalogue.list_content(dataset))
    assert len(content) == 10_000
    assert all(info.type is DIDType.FILE and info.size and info.adler32 for info in content)
    infos = catalogue.get_infos([info.did for info in content])
    assert [info.did for info in infos] == [info.did for info in content]
    assert all(info.created_at > 1e9 for info in infos)
    assert [i.size for i in infos] == [i.size for i in content]


def test_refused_credentials(lake: Any, seed: Any, tmp_path: Path) -> None:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(lake.rucio_config)
    if parser.get("client", "auth_type", fallback="") != "userpass":
        pytest.skip("the lake does not use userpass")
    parser.set("client", "password", "wrong-" + parser.get("client", "password"))
    parser.set("client", "auth_token_file_path", str(tmp_path / "token"))
    bad = tmp_path / "rucio.cfg"
    with open(bad, "w") as fh:
        parser.write(fh)
    adapter = RucioCatalogue(Config(rucio_config=str(bad)))
    try:
        with pytest.raises(AccessDeniedError) as caught:
            adapter.list_scopes()
    finally:
        adapter.close()
    assert "wrong-" not in str(caught.value)
