"""A dataset read again from a warm block cache, on a fresh mount: no catalogue call, no GET, the next
files paged in from the cache's disk ahead of the reader; each small file cached as one file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from datalakefs.demo.status import LakeStatus
from tests.fuse.test_read import _expected, _read_all, _small_dataset

pytestmark = [pytest.mark.lake, pytest.mark.fuse]


def _read_dataset(mount: Any, scope: str, name: str) -> list[tuple[str, bytes]]:
    directory = mount.mountpoint / scope / name
    entries = sorted(os.scandir(directory), key=lambda entry: entry.name)
    for entry in entries:
        entry.stat()  # as `ls -l` does
    return [(entry.name, _read_all(Path(entry.path))) for entry in entries]


def test_a_warm_read_of_a_dataset_asks_neither_the_catalogue_nor_the_storage(
    lake: LakeStatus, new_mount: Any, rucio_client: Any, tmp_path: Path
) -> None:
    plan = _small_dataset(lake, rucio_client, 30)
    expected = [(spec.name, _expected(lake, spec.did, spec.size)) for spec in plan.files]
    cold = new_mount()
    cold.start()
    assert _read_dataset(cold, plan.scope, plan.name) == expected
    cold.stop()
    cache = tmp_path / "cache0"
    cached = [path.name for path in (cache / "v3").rglob("*") if path.is_file()]
    assert len(cached) == len(plan.files) and all(n.endswith(".data") for n in cached)  # one file each
    (cache / "v2" / "ab").mkdir(parents=True)  # a cache of the earlier format: gone when a mount starts
    warm = new_mount(f"cache_dir={cache}")  # the cold mount's block cache
    warm.start()
    assert sorted(os.listdir(cache)) == ["v3"]
    directory = warm.mountpoint / plan.scope / plan.name
    assert len(os.listdir(directory)) == len(plan.files)
    listed = warm.status()
    assert _read_dataset(warm, plan.scope, plan.name) == expected
    read = warm.status()
    assert read["catalogue"]["calls"] == listed["catalogue"]["calls"]
    assert read["content"]["requests"] == 0
    assert read["content"]["hits"] - listed["content"]["hits"] >= len(plan.files)
    # the files ahead of the reader were read from the cache's disk in the background (one batch per
    # window), and none was handed to a fetch
    assert read["prefetch"]["paged_in"] >= len(plan.files) - 2
    assert read["prefetch"]["started"] == listed["prefetch"]["started"]
