"""``datalakefs cache stats|clear [MOUNTPOINT]``: the local block cache.

Which cache: the mount the path given is under, else the one running mount recorded in this
configuration's state directory, else (nothing mounted) the configuration's ``cache_dir`` itself.

* ``stats`` of a mount is what its daemon reports in ``.datalakefs/status.json`` (cache contents plus
  hits, misses, bytes fetched since the mount started); without a mount the cache directory is read
  and its journals replayed, as a daemon would at start (damaged entries are dropped then).
* ``clear`` of a mount goes through its control directory: setting the extended attribute
  ``user.datalakefs.cache.clear`` on ``/<mount>/.datalakefs`` makes the daemon drop every block, so its
  index and the files on disk change together. Without a mount the cache directory is emptied directly;
  never do that to a cache directory another process is using.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import trio

from datalakefs.cache.store import BlockCache
from datalakefs.cli.common import load_config, with_config
from datalakefs.cli.progress import human_bytes
from datalakefs.config import Config
from datalakefs.errors import ConfigError
from datalakefs.fs.filesystem import CLEAR_CACHE_XATTR
from datalakefs.fuse.session import mount_of
from datalakefs.namespace.tree import CONTROL_DIR

STATUS_FILE = "status.json"


def _running_mount(config: Config, given: str | None) -> Path | None:
    """The mount whose cache is meant, or None for the configuration's cache directory."""
    if given is not None:
        mountpoint = mount_of(given)
        if mountpoint is None:
            raise ConfigError(f"{given} is not under a running datalakefs mount")
        return mountpoint
    mounts = []
    for record in sorted((config.state_dir / "mounts").glob("*.json")):
        mountpoint = Path(json.loads(record.read_text())["mountpoint"])
        if (mountpoint / CONTROL_DIR / STATUS_FILE).is_file():
            mounts.append(mountpoint)
    if len(mounts) > 1:
        raise ConfigError("several mounts are running: name one (" + ", ".join(map(str, mounts)) + ")")
    return mounts[0] if mounts else None


def _offline_cache(config: Config) -> BlockCache:
    cache = BlockCache(config.cache_dir, capacity=config.cache_size, block_size=config.block_size)
    cache.load()
    return cache


def cmd_stats(args: argparse.Namespace) -> int:
    config = load_config(args)
    mountpoint = _running_mount(config, args.mountpoint)
    report: dict[str, Any]
    if mountpoint is not None:
        status = json.loads((mountpoint / CONTROL_DIR / STATUS_FILE).read_text())
        report = {"source": str(mountpoint), **status["content"]}
    else:
        cache = _offline_cache(config)
        try:
            report = {"source": str(config.cache_dir), "cache": asdict(cache.statistics())}
        finally:
            cache.close()
    if args.json:
        print(json.dumps(report, indent=1, sort_keys=True))
        return 0
    cache_stats = report["cache"]
    print(f"cache of {report['source']}")
    print(f"  used       {human_bytes(cache_stats['used_bytes'])} of {human_bytes(cache_stats['capacity'])} "
          f"({cache_stats['files']} files, {cache_stats['blocks']} blocks)")
    print(f"  evicted    {human_bytes(cache_stats['evicted_bytes'])} ({cache_stats['evictions']} evictions)")
    print(f"  corrupt    {cache_stats['corrupt_blocks']} blocks dropped, "
          f"{cache_stats['checksum_mismatches']} whole-file checksum mismatches")
    if "hits" in report:
        print(f"  reads      {report['hits']} hits, {report['misses']} misses (hit rate {report['hit_rate']:.1%})")
        print(f"  fetched    {human_bytes(report['bytes_fetched'])} in {report['requests']} requests "
              f"({report['failed_requests']} failed)")
    return 0


def cmd_clear(args: argparse.Namespace) -> int:
    config = load_config(args)
    mountpoint = _running_mount(config, args.mountpoint)
    if mountpoint is not None:
        os.setxattr(mountpoint / CONTROL_DIR, CLEAR_CACHE_XATTR, b"1")
        print(f"datalakefs: cleared the cache of {mountpoint}")
        return 0
    cache = _offline_cache(config)
    try:
        trio.run(cache.clear)
    finally:
        cache.close()
    print(f"datalakefs: cleared {config.cache_dir}")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cache = sub.add_parser("cache", help="show or clear the local block cache")
    actions = cache.add_subparsers(dest="action", required=True)
    stats = with_config(actions.add_parser("stats", help="what the cache holds and how it served reads"))
    stats.add_argument("mountpoint", nargs="?", metavar="PATH",
                       help="a path under a running mount (default: this configuration's mount)")
    stats.add_argument("--json", action="store_true", help="machine-readable output")
    stats.set_defaults(handler=cmd_stats)
    clear = with_config(actions.add_parser("clear", help="drop every cached block"))
    clear.add_argument("mountpoint", nargs="?", metavar="PATH",
                       help="a path under a running mount (default: this configuration's mount)")
    clear.set_defaults(handler=cmd_clear)
