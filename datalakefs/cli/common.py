"""What every subcommand shares: configuration from --config/-o (or from the mount a path is under),
logging, the mount registry."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

from datalakefs import config as configuration
from datalakefs.cli.logs import setup_logging
from datalakefs.errors import ConfigError
from datalakefs.fuse.session import mount_of
from datalakefs.namespace.tree import CONFIG_FILE, CONTROL_DIR

__all__ = ["load_config", "mount_config", "registry_file", "setup_logging", "with_config"]

# Options mount(8) passes to every helper that mean nothing to datalakefs (`ro` does: see Config.ro).
_MOUNT8_OPTIONS = frozenset({"rw", "defaults", "auto", "noauto", "user", "users", "nouser", "_netdev",
                             "nofail", "exec", "noexec", "suid", "nosuid", "dev", "nodev", "atime",
                             "noatime", "relatime"})


def with_config(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Give a subcommand the --config and -o options."""
    parser.add_argument("--config", help="TOML configuration file (default: $DATALAKEFS_CONFIG, "
                                         "~/.config/datalakefs/config.toml)")
    parser.add_argument("-o", dest="options", action="append", metavar="KEY=VALUE,...",
                        help="override configuration options")
    return parser


def load_config(args: argparse.Namespace, under: str | None = None) -> configuration.Config:
    """The configuration of ``--config``/``-o``; for a command on a path ``under`` a running mount
    (and no ``--config``), that mount's own configuration, with ``-o`` applied on top."""
    overrides: dict[str, str] = {}
    for text in args.options or []:
        overrides.update(configuration.parse_mount_options(text))
    for key in _MOUNT8_OPTIONS & overrides.keys():
        del overrides[key]
    # fstab lines cannot pass --config: `-o config=FILE` names the file instead.
    config_file = overrides.pop("config", None) or args.config
    mount = mount_of(under) if under is not None and config_file is None else None
    base = mount_config(mount) if mount is not None else None
    return configuration.load(config_file, overrides, base=base)


def mount_config(mountpoint: Path) -> configuration.Config:
    """The options a running mount was made with (its ``.datalakefs/config.json``)."""
    path = mountpoint / CONTROL_DIR / CONFIG_FILE
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{mountpoint}: cannot read the mount's configuration {path}: {exc}") from None
    return configuration.apply(configuration.Config(), values)


def registry_file(state_dir: Path, mountpoint: str) -> Path:
    """Where a running mount records its daemon's pid (``<state_dir>/mounts/<hash>.json``)."""
    digest = hashlib.sha256(os.path.abspath(mountpoint).encode()).hexdigest()[:16]
    return state_dir / "mounts" / f"{digest}.json"
