"""The FTS3-REST test shim: Rucio's conveyor submits rule transfers to it and it copies the bytes.

It writes to the protected WebDAV doors with its own bearer token (``etc/fts-token``, minted at
every ``up`` by the lake's issuer), as a real FTS writes with the credential delegated to it.
Its knobs (a delay before each copy, a URL pattern to fail) live in a JSON file that the running
shim re-reads, so tests change them without a restart.
"""

from __future__ import annotations

import json

from datalakefs.demo.layout import Layout, ProgressFn
from datalakefs.demo.processes import ServiceSpec, Site, write_atomic
from datalakefs.demo.status import Knobs


def read_knobs(layout: Layout) -> Knobs:
    try:
        return Knobs.from_json(json.loads(layout.knobs.read_text()))
    except FileNotFoundError:
        return Knobs()


def write_knobs(layout: Layout, knobs: Knobs) -> None:
    """Set the FTS shim's knobs; the running shim picks them up before its next file copy."""
    layout.etc.mkdir(parents=True, exist_ok=True)
    write_atomic(layout.knobs, json.dumps(knobs.to_json()) + "\n")


def _start(site: Site, _step: ProgressFn) -> None:
    layout = site.layout
    site.spawn_script("fts", "fts_shim.py", port=site.ports["fts"], knobs=layout.knobs,
                      state=layout.run / "fts-jobs.json", log=layout.log / "fts-shim.log",
                      token_file=layout.service_token)


SERVICE = ServiceSpec("fts", "FTS3-REST test shim", ("fts",), _start, http_path="/")
