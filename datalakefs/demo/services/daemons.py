"""Rucio's daemons (conveyor, judge, reaper) in one loop process that touches a heartbeat file."""

from __future__ import annotations

from datalakefs.demo.layout import ProgressFn
from datalakefs.demo.processes import ServiceSpec, Site
from datalakefs.demo.services.rucio import server_env


def _start(site: Site, _step: ProgressFn) -> None:
    layout = site.layout
    layout.heartbeat.unlink(missing_ok=True)
    site.spawn(
        "daemons",
        [
            str(layout.venv / "bin" / "python"),
            str(layout.lib / "daemons.py"),
            "--interval",
            "1",
            "--heartbeat",
            str(layout.heartbeat),
        ],
        cwd=layout.run,
        env=server_env(layout),
    )


SERVICE = ServiceSpec(
    "daemons",
    "Rucio daemons loop (conveyor, judge, reaper)",
    (),
    _start,
    heartbeat=True,
    depends_on=("postgres",),
)
