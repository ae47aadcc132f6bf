"""PostgreSQL, Rucio's database: a private cluster in the state directory, started without fsync."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from datalakefs.demo.layout import DemoError, ProgressFn
from datalakefs.demo.processes import Identity, ServiceSpec, Site, clean_env, is_alive, tail


def pg_bin() -> Path:
    candidates = sorted(
        (p for p in Path("/usr/lib/postgresql").glob("*/bin") if (p / "postgres").exists()),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    if not candidates:
        raise DemoError(
            "PostgreSQL is not installed (/usr/lib/postgresql/*/bin): run scripts/install-system-packages.sh"
        )
    return candidates[-1]


def _pg_run(site: Site, argv: Sequence[str], log: Path) -> None:
    ident = Identity.of(site.run_as.postgres)
    with open(log, "ab") as fh:
        rc = subprocess.run(
            argv,
            stdout=fh,
            stderr=subprocess.STDOUT,
            cwd=site.layout.pg,
            check=False,
            user=ident.user,
            group=ident.group,
            extra_groups=ident.extra_groups,
        ).returncode
    if rc != 0:
        raise DemoError(f"{Path(argv[0]).name} failed (rc {rc}); see {log}:\n{tail(log)}")


def start(site: Site, step: ProgressFn) -> None:
    """Create the cluster if there is none, start PostgreSQL and wait until it accepts connections."""
    layout, bin_dir, port = site.layout, pg_bin(), site.ports["postgres"]
    if not (layout.pg_data / "PG_VERSION").exists():
        (layout.pg / "bootstrapped").unlink(missing_ok=True)
        if layout.pg_data.exists():
            shutil.rmtree(layout.pg_data)
        _pg_run(
            site,
            [
                str(bin_dir / "initdb"),
                "-D",
                str(layout.pg_data),
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ],
            layout.log / "initdb.log",
        )
        step("PostgreSQL cluster created")
    rec = site.spawn(
        "postgres",
        [
            str(bin_dir / "postgres"),
            "-D",
            str(layout.pg_data),
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-k",
            str(layout.pg),
            "-c",
            "fsync=off",
            "-c",
            "synchronous_commit=off",
            "-c",
            "full_page_writes=off",
            "-c",
            "max_connections=200",
        ],
        cwd=layout.pg,
        user=site.run_as.postgres,
        env=clean_env(LC_ALL="C"),
    )
    deadline = time.monotonic() + 60
    while True:
        ready = (
            subprocess.run(
                [str(bin_dir / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(port)],
                check=False,
            ).returncode
            == 0
        )
        if ready:
            break
        if not is_alive(rec) or time.monotonic() > deadline:
            log = layout.log / "postgres.out"
            raise DemoError(f"PostgreSQL did not start; see {log}:\n{tail(log)}")
        time.sleep(0.1)
    step(f"PostgreSQL ready on 127.0.0.1:{port}")


def psql(site: Site, sql: str) -> str:
    return subprocess.run(
        [
            str(pg_bin() / "psql"),
            "-h",
            "127.0.0.1",
            "-p",
            str(site.ports["postgres"]),
            "-U",
            "postgres",
            "-tAq",
            "-c",
            sql,
        ],
        capture_output=True,
        text=True,
        check=True,
        env=clean_env(),
    ).stdout.strip()


SERVICE = ServiceSpec("postgres", "PostgreSQL (Rucio's database)", ("postgres",), start, stop_signal=signal.SIGINT)
