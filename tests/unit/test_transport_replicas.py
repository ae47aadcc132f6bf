"""Candidate URLs: XCache first (swap or Rucio forwarding), preference order, HTTP(S) only."""

from __future__ import annotations

import pytest

from datalakefs.config import Config
from datalakefs.errors import ConfigError
from datalakefs.model import DID, DIDInfo, DIDType, FileReplicas, Replica
from datalakefs.transport.replicas import candidates

INFO = DIDInfo(DID("test", "f.bin"), DIDType.FILE, size=10, adler32="00000001")
HTTP = "http://127.0.0.1:38094/LAKE-ORIGIN/test/aa/bb/f.bin"
ROOT = "root://127.0.0.1:31094//LAKE-ORIGIN/test/aa/bb/f.bin"
DAVS = "davs://127.0.0.1:38081/SCRATCH/test/aa/bb/f.bin"


def urls(replicas: list[Replica], **config: object) -> list[tuple[str, str, bool]]:
    found = candidates(FileReplicas(INFO, tuple(replicas)), Config().replace(**config))
    return [(c.url, c.rse, c.via_xcache) for c in found]


def test_without_xcache_only_http_urls_are_streamable_and_dav_means_http() -> None:
    assert urls([Replica("ORIGIN", ROOT), Replica("ORIGIN", HTTP), Replica("SCRATCH", DAVS)]) == [
        (HTTP, "ORIGIN", False),
        ("https://127.0.0.1:38081/SCRATCH/test/aa/bb/f.bin", "SCRATCH", False),
    ]


def test_swap_mode_puts_the_xcache_first_with_host_and_port_swapped() -> None:
    found = urls([Replica("ORIGIN", ROOT), Replica("ORIGIN", HTTP)], xcache="127.0.0.1:38095")
    assert found == [
        ("http://127.0.0.1:38095/LAKE-ORIGIN/test/aa/bb/f.bin", "ORIGIN", True),  # both PFNs, one URL
        (HTTP, "ORIGIN", False),
    ]


def test_only_the_rses_the_xcache_fronts_are_read_through_it() -> None:
    scratch = "https://127.0.0.1:38081/SCRATCH/test/aa/bb/f.bin"
    found = urls([Replica("ORIGIN", HTTP), Replica("SCRATCH", scratch)], xcache="127.0.0.1:38095",
                 xcache_rses=("ORIGIN",))
    assert found == [
        ("http://127.0.0.1:38095/LAKE-ORIGIN/test/aa/bb/f.bin", "ORIGIN", True),
        (HTTP, "ORIGIN", False),
        (scratch, "SCRATCH", False),
    ]


def test_rucio_mode_forwards_root_pfns_and_reads_http_inner_urls_directly() -> None:
    proxied_root = "root://127.0.0.1:31096//" + ROOT
    proxied_http = "root://127.0.0.1:31096//" + HTTP
    found = urls(
        [Replica("ORIGIN", proxied_http), Replica("ORIGIN", proxied_root)],
        xcache="http://127.0.0.1:38096/",
        xcache_mode="rucio",
    )
    assert found == [
        ("http://127.0.0.1:38096//" + ROOT, "ORIGIN", True),
        (HTTP, "ORIGIN", False),
    ]


def test_rucio_mode_also_forwards_a_plain_root_pfn() -> None:
    found = urls([Replica("ORIGIN", ROOT)], xcache="127.0.0.1:38096", xcache_mode="rucio")
    assert found == [("http://127.0.0.1:38096//" + ROOT, "ORIGIN", True)]


def test_preference_orders_rses_then_catalogue_order_is_kept() -> None:
    replicas = [Replica("A", "http://a/f"), Replica("B", "http://b/f"), Replica("C", "http://c/f")]
    assert [rse for _, rse, _ in urls(replicas, rse_preference=("C",))] == ["C", "A", "B"]
    assert [rse for _, rse, _ in urls(replicas)] == ["A", "B", "C"]
    swapped = urls(replicas, rse_preference=("B",), xcache="x:1")
    assert [(rse, via) for _, rse, via in swapped] == [("B", True), ("B", False), ("A", False), ("C", False)]


def test_root_only_replicas_without_xcache_give_nothing_to_stream() -> None:
    assert urls([Replica("ORIGIN", ROOT)]) == []


@pytest.mark.parametrize("bad", ["ftp://x:1", "http://x:1/path", "http://"])
def test_invalid_xcache_is_a_config_error(bad: str) -> None:
    with pytest.raises(ConfigError, match="xcache"):
        urls([Replica("ORIGIN", HTTP)], xcache=bad)
