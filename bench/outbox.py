"""Outbox upload benchmark: datalakefs against curl PUTs to the same RSE, in one run.

    python -m bench.outbox [--state-dir .demo] [--port-base 38000] [--big-mib 1024] [--small-count 1000]

1. One big file (1 GiB): time until ``close()`` returns when copied into the outbox, and until the
   upload is done (replica AVAILABLE, attached: the file left the outbox), against one
   ``curl -T`` of the same file to the same RSE's WebDAV door (goal: ≤ 1.1×).
2. Many 1 MiB files: aggregate rate from the first write until the last one is uploaded, against
   ``curl`` PUTs of the same files with the same parallelism (``upload_concurrency``; goal ≥ 0.8×).

Needs the demo lake (``datalakefs demo up``; started here when it is not up). Writes
``bench/results/<date>/outbox.md`` and ``.json`` and prints the table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from datalakefs.demo.lake import Lake

CHUNK = 1 << 20
PARALLEL = 4


def _datalakefs(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "datalakefs", *args], check=True, capture_output=True, text=True)


def _write_random(path: Path, size: int) -> None:
    with open(path, "wb") as fh:
        for start in range(0, size, CHUNK):
            fh.write(os.urandom(min(CHUNK, size - start)))


def _copy(source: Path, target: Path) -> None:
    with open(source, "rb") as src, open(target, "wb") as dst:
        while chunk := src.read(CHUNK):
            dst.write(chunk)


def _wait_gone(paths: list[Path], timeout: float = 3600.0) -> float:
    deadline = time.monotonic() + timeout
    pending = list(paths)
    while pending:
        pending = [p for p in pending if p.exists()]
        if time.monotonic() > deadline:
            raise SystemExit(f"uploads did not finish: {len(pending)} left")
        time.sleep(0.02)
    return time.monotonic()


def _curl_put(files: list[tuple[Path, str]], ca: Path, parallel: int) -> float:
    """Seconds for PUTting every (file, url) with ``parallel`` curls at once."""
    lines = "".join(f"{path}\t{url}\n" for path, url in files)
    script = f'IFS=$\'\\t\' read -r f u <<< "$1"; curl -sS -f --cacert {ca} -T "$f" "$u" -o /dev/null'
    start = time.monotonic()
    subprocess.run(["xargs", "-d", "\n", "-P", str(parallel), "-I{}", "bash", "-c", script, "_", "{}"],
                   input=lines, text=True, check=True)
    return time.monotonic() - start


def run(state_dir: Path, port_base: int, big_mib: int, small_count: int) -> dict[str, Any]:
    subprocess.run([sys.executable, "-m", "datalakefs.demo.command", "up", "--state-dir", str(state_dir),
                    "--port-base", str(port_base)], check=True)
    status = Lake(state_dir).status()
    assert status.seed is not None
    os.environ.update(status.env)
    from rucio.client import Client

    client = Client()
    scope, rse = status.seed.upload_scope, status.seed.scratch_rse
    ca = status.datalakefs_config.parent / "dav.crt"
    results: dict[str, Any] = {"big_bytes": big_mib << 20, "small_count": small_count, "parallel": PARALLEL}
    with tempfile.TemporaryDirectory(prefix="bench-outbox-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        mountpoint = work / "lake"
        mountpoint.mkdir()
        options = [f"state_dir={work / 'state'}", f"cache_dir={work / 'cache'}", f"storage_ca_bundle={ca}",
                   f"upload_concurrency={PARALLEL}"]
        _datalakefs("mount", str(mountpoint), "--config", str(status.datalakefs_config),
                    *[a for o in options for a in ("-o", o)])
        try:
            tag = secrets.token_hex(4)
            dataset = mountpoint / ".outbox" / scope / f"bench_{tag}"
            dataset.mkdir()
            source = work / "big.bin"
            _write_random(source, big_mib << 20)
            target = dataset / f"big_{tag}.bin"
            start = time.monotonic()
            _copy(source, target)
            results["big_close_s"] = time.monotonic() - start
            results["big_available_s"] = _wait_gone([target]) - start
            pfn = client.lfns2pfns(rse, [f"{scope}:curl_big_{tag}.bin"], operation="write", scheme="https")
            results["big_curl_s"] = _curl_put([(source, next(iter(pfn.values())))], ca, 1)
            source.unlink()

            small_dir = work / "small"
            small_dir.mkdir()
            sources = [small_dir / f"s{i:05d}" for i in range(small_count)]
            for path in sources:
                _write_random(path, CHUNK)
            targets = [dataset / f"small_{tag}_{i:05d}" for i in range(small_count)]
            start = time.monotonic()
            for src, dst in zip(sources, targets, strict=True):
                _copy(src, dst)
            results["small_datalakefs_s"] = _wait_gone(targets) - start
            lfns = [f"{scope}:curl_small_{tag}_{i:05d}" for i in range(small_count)]
            pfns: dict[str, str] = {}
            for start in range(0, len(lfns), 20):  # the LFNs travel in the URL
                pfns.update(client.lfns2pfns(rse, lfns[start : start + 20], operation="write", scheme="https"))
            results["small_curl_s"] = _curl_put([(s, pfns[lfn]) for s, lfn in zip(sources, lfns, strict=True)],
                                                ca, PARALLEL)
        finally:
            _datalakefs("umount", str(mountpoint), "--config", str(status.datalakefs_config),
                        *[a for o in options for a in ("-o", o)])
    mib = 1 << 20
    results["small_datalakefs_mib_s"] = small_count / results["small_datalakefs_s"]
    results["small_curl_mib_s"] = small_count / results["small_curl_s"]
    results["big_ratio"] = results["big_available_s"] / results["big_curl_s"]
    results["small_ratio"] = results["small_datalakefs_mib_s"] / results["small_curl_mib_s"]
    results["big_mib_s_curl"] = (big_mib << 20) / mib / results["big_curl_s"]
    return results


def table(r: dict[str, Any]) -> str:
    return "\n".join([
        "| measurement | datalakefs | curl PUT | ratio | goal |",
        "|---|---|---|---|---|",
        f"| {r['big_bytes'] >> 20} MiB: close() returned | {r['big_close_s']:.2f} s | | | |",
        f"| {r['big_bytes'] >> 20} MiB: uploaded (AVAILABLE, attached) | {r['big_available_s']:.2f} s "
        f"| {r['big_curl_s']:.2f} s | {r['big_ratio']:.2f}× time | ≤ 1.1× |",
        f"| {r['small_count']} × 1 MiB, {r['parallel']} in parallel | {r['small_datalakefs_mib_s']:.1f} MiB/s "
        f"| {r['small_curl_mib_s']:.1f} MiB/s | {r['small_ratio']:.2f}× rate | ≥ 0.8× |",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--state-dir", type=Path, default=Path(".demo"))
    parser.add_argument("--port-base", type=int, default=38000)
    parser.add_argument("--big-mib", type=int, default=1024)
    parser.add_argument("--small-count", type=int, default=1000)
    args = parser.parse_args()
    results = run(args.state_dir.resolve(), args.port_base, args.big_mib, args.small_count)
    out = Path("bench/results") / datetime.date.today().isoformat()
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python -m bench.outbox", *sys.argv[1:]])
    (out / "outbox.json").write_text(json.dumps({"command": command, **results}, indent=1, sort_keys=True) + "\n")
    text = f"# outbox upload benchmark\n\n`{command}`\n\n{table(results)}\n"
    (out / "outbox.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
