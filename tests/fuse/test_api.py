"""The notebook API (``import datalakefs``) against a running mount of the real lake (issue 15)."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from typing import Any

import pytest

import datalakefs
from datalakefs.demo.status import LakeStatus
from tests.fuse.mounting import Mount
from tests.fuse.test_nonroot import wait_for
from tests.fuse.test_staging import fresh_dataset

pytestmark = [pytest.mark.lake, pytest.mark.fuse]


def test_stage_wait_state_replicas_and_status(lake: LakeStatus, rucio_client: Any,
                                              new_mount: Callable[..., Mount]) -> None:
    assert lake.seed is not None
    plan = fresh_dataset(lake, rucio_client, (1000, 2000))
    mount = new_mount()
    mount.start()
    dataset = mount.mountpoint / plan.scope / plan.name
    assert datalakefs.state(dataset) == "not staged"

    staged = datalakefs.stage(dataset, wait=True, timeout=120)
    assert re.match(r"rule \w+ OK: 2/2 locks OK", staged), staged
    assert datalakefs.state(dataset) == staged
    first = dataset / plan.files[0].name
    assert {lake.seed.origin_rse, lake.seed.scratch_rse} <= set(datalakefs.replicas(first))

    status = datalakefs.status(first)
    assert status["mountpoint"] == str(mount.mountpoint)
    assert status["staging"]["collections"][0]["did"] == f"{plan.scope}:{plan.name}"

    # the outbox: what a notebook writes back, and how far it got
    name = f"api_{uuid.uuid4().hex[:8]}"
    target = mount.mountpoint / ".outbox" / lake.seed.upload_scope / name
    target.mkdir()
    (target / f"{name}.txt").write_bytes(b"42\n")  # file names are unique per scope in Rucio
    before = datalakefs.outbox_status(mount.mountpoint)
    assert set(before) == {"summary", "files"}
    done = wait_for(lambda: datalakefs.outbox_status(target)["summary"]["uploaded"] >= 1, "the upload")
    assert done


def test_stage_raises_when_the_rule_is_stuck(lake: LakeStatus, rucio_client: Any, new_mount: Callable[..., Mount],
                                             fts_knobs: Callable[..., None]) -> None:
    plan = fresh_dataset(lake, rucio_client, (1000,))
    fts_knobs(fail=re.escape(plan.files[0].name))
    mount = new_mount()
    mount.start()
    with pytest.raises(datalakefs.StagingError, match="STUCK"):
        datalakefs.stage(mount.mountpoint / plan.scope / plan.name / plan.files[0].name, wait=True, timeout=120)


def test_paths_outside_a_mount_are_a_clear_error(tmp_path: Any) -> None:
    with pytest.raises(FileNotFoundError, match="not under a running datalakefs mount"):
        datalakefs.outbox_status(tmp_path)
