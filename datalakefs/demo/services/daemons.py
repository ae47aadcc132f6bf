"""Rucio's daemons (conveyor, judge, reaper) in one loop process that touches a heartbeat file."""

from __future__ import annotations

from datalakefs.demo.layout import ProgressFn
from datalakefs.demo.processes import ServiceSpec, Site
from datalakefs.demo.services.rucio import server_env


def _start(site: Site, _step: ProgressFn) -> None:
    layout = site.layout
    layout.heartbeat.unlink(missing_ok=True)
    site.spawn_script("daemons", "daemons.py", env=server_env(layout), interval=1, heartbeat=layout.heartbeat)


SERVICE = ServiceSpec(
    "daemons",
    "Rucio daemons loop (conveyor, judge, reaper)",
    (),
    _start,
    heartbeat=True,
    depends_on=("postgres",),
)
