"""Settings: one TOML file, every option overridable with ``-o key=value``.

Lookup order of the file: ``--config``, ``$DATALAKEFS_CONFIG``, ``~/.config/datalakefs/config.toml``
(a missing default file is fine, a missing named file is an error). The Rucio side (server, account,
auth) is never configured here: it comes from rucio's own ``rucio.cfg`` (``$RUCIO_CONFIG``).
Sizes accept ``K``/``M``/``G``/``T`` suffixes (powers of 1024); durations are seconds or take
``ms``/``s``/``m``/``h``/``d`` suffixes, also combined (``5m``, ``2h``, ``1h30m``). An unknown key or a value that does
not parse raises :class:`ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from datalakefs.errors import ConfigError

StagingPolicy = Literal["stream", "rule", "auto"]
XCacheMode = Literal["swap", "rucio"]

_SIZE_SUFFIX = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE_KEYS = frozenset(
    {"cache_size", "block_size", "prefetch_max", "spool_reserve", "upload_while_writing", "transfer_min_rate",
     "listing_prefetch_bytes"}
)
_DURATION_KEYS = frozenset({"http_timeout", "staging_timeout", "entry_timeout", "attr_timeout", "catalogue_ttl",
                            "negative_ttl", "catalogue_timeout", "rule_lifetime"})
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|s|m|h|d)")


def _systemd_directory(variable: str) -> Path | None:
    """The directory systemd made for the unit (``CacheDirectory=`` gives ``$CACHE_DIRECTORY``, a
    colon-separated list when several are named: the first is ours)."""
    value = os.environ.get(variable, "").split(":")[0]
    return Path(value) if value else None


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return _systemd_directory("CACHE_DIRECTORY") or Path(base) / "datalakefs"


def _default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return _systemd_directory("STATE_DIRECTORY") or Path(base) / "datalakefs"


@dataclass(frozen=True, slots=True)
class Config:
    """Every option of a mount. docs/CONFIGURATION.md lists them with their meaning."""

    rucio_config: str | None = None
    scopes: tuple[str, ...] = ()
    cache_dir: Path = field(default_factory=_default_cache_dir)
    state_dir: Path = field(default_factory=_default_state_dir)
    cache_size: int = 20 << 30
    block_size: int = 1 << 20
    prefetch_max: int = 64 << 20
    piece_reads: bool = True
    xcache: str | None = None
    xcache_mode: XCacheMode = "swap"
    xcache_rses: tuple[str, ...] = ()
    client_site: str | None = None
    rse_preference: tuple[str, ...] = ()
    read_schemes: tuple[str, ...] = ("http", "https", "root")
    http_timeout: float = 30.0
    transfer_min_rate: int = 256 << 10
    http_retries: int = 2
    staging: StagingPolicy = "stream"
    staging_rse: str | None = None
    staging_local_paths: tuple[str, ...] = ()
    rule_lifetime: int = 7 * 24 * 3600
    rule_activity: str | None = None
    rule_account: str | None = None
    staging_timeout: float = 600.0
    upload_rse: str | None = None
    upload_rule_rse: str | None = None
    spool_reserve: int = 64 << 20
    spool_dir: Path | None = None
    storage_ca_bundle: str | None = None
    allow_token_over_http: bool = False
    upload_concurrency: int = 4
    upload_while_writing: int = 64 << 20
    entry_timeout: float = 3600.0
    attr_timeout: float = 3600.0
    catalogue_ttl: float = 300.0
    negative_ttl: float = 10.0
    listing_times_limit: int = 1000
    catalogue_timeout: float = 30.0
    catalogue_concurrency: int = 4
    read_ahead_kb: int = 1024
    listing_prefetch_files: int = 16
    listing_prefetch_bytes: int = 64 << 20
    xattrs: bool = True
    allow_other: bool = False
    uid: int | None = None
    gid: int | None = None
    umask: int = 0o022
    ro: bool = False
    log_level: str = "INFO"
    metrics_port: int | None = None
    metrics_address: str = "127.0.0.1"

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        """Every option as TOML/JSON values (paths as strings, tuples as lists): :func:`apply` of it
        on a default ``Config`` gives this one back."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def _parse_size(key: str, text: str) -> int:
    raw = text.strip().upper().removesuffix("B").removesuffix("I")
    factor = 1
    if raw and raw[-1] in _SIZE_SUFFIX:
        factor, raw = _SIZE_SUFFIX[raw[-1]], raw[:-1]
    try:
        value = int(float(raw) * factor)
    except ValueError:
        raise ConfigError(f"option {key}: {text!r} is not a size (e.g. 20G, 512M)") from None
    if value < 0:
        raise ConfigError(f"option {key}: a size cannot be negative")
    return value


def duration(text: str) -> float:
    """Seconds from ``90``, ``1.5``, ``30s``, ``5m``, ``2h``, ``7d`` or ``1h30m``; ValueError otherwise."""
    raw = text.strip().lower()
    try:
        seconds = float(raw)
    except ValueError:
        parts = _DURATION_PART.findall(raw)
        if not parts or "".join(number + unit for number, unit in parts) != raw:
            raise ValueError(f"{text!r} is not a duration (e.g. 30, 30s, 5m, 2h, 1h30m)") from None
        seconds = sum(float(number) * _DURATION_UNITS[unit] for number, unit in parts)
    if seconds < 0:
        raise ValueError(f"{text!r}: a duration cannot be negative")
    return seconds


def _parse_umask(value: Any) -> int:
    """An octal string (``022``, ``0o022``, as mount(8) and rclone write it) or a TOML integer."""
    try:
        mask = value if isinstance(value, int) else int(str(value).strip().removeprefix("0o"), 8)
    except ValueError:
        raise ConfigError(f"option umask: {value!r} is not an octal mask (e.g. 022)") from None
    if not 0 <= mask <= 0o777:
        raise ConfigError(f"option umask: {value!r} is outside 000..777")
    return mask


def _convert(key: str, hint: Any, value: Any) -> Any:
    """Turn a TOML value or an ``-o`` string into the field's type."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        if value is None or (isinstance(value, str) and value.lower() in ("", "none")):
            return None
        inner = next(a for a in args if a is not type(None))
        return _convert(key, inner, value)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"option {key}: {value!r} is not one of {', '.join(map(str, args))}")
        return value
    if origin is tuple:
        items = value.split(",") if isinstance(value, str) else list(value)
        return tuple(str(i).strip() for i in items if str(i).strip())
    if hint is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"option {key}: {value!r} is not a boolean")
    if hint is int and key in _SIZE_KEYS and isinstance(value, str):
        return _parse_size(key, value)
    if key == "umask":
        return _parse_umask(value)
    if key in _DURATION_KEYS and isinstance(value, str):
        try:
            return hint(duration(value))
        except ValueError as exc:
            raise ConfigError(f"option {key}: {exc}") from None
    if hint is Path:
        return Path(os.path.expanduser(str(value)))
    try:
        return hint(value)
    except (TypeError, ValueError):
        raise ConfigError(f"option {key}: {value!r} is not a valid {hint.__name__}") from None


def apply(config: Config, values: Mapping[str, Any]) -> Config:
    """Return ``config`` with ``values`` applied; unknown keys raise :class:`ConfigError`."""
    hints = typing.get_type_hints(Config)
    changes: dict[str, Any] = {}
    for raw_key, value in values.items():
        key = raw_key.replace("-", "_")
        if key not in hints:
            raise ConfigError(f"unknown option {raw_key!r}")
        changes[key] = _convert(key, hints[key], value)
    return config.replace(**changes)


def parse_mount_options(text: str) -> dict[str, str]:
    """Parse ``-o a=1,b,c=x`` into a dict; a bare flag means ``true``.

    Values containing commas (lists) are written with ``:`` inside -o, e.g.
    ``rse_preference=A:B``; ``scopes`` and other list options accept either.
    """
    result: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        result[key.strip()] = value.strip() if sep else "true"
    return result


def config_file_path(explicit: str | None) -> Path | None:
    if explicit:
        return Path(explicit)
    env = os.environ.get("DATALAKEFS_CONFIG")
    if env:
        return Path(env)
    default = Path(os.path.expanduser("~/.config/datalakefs/config.toml"))
    return default if default.exists() else None


def load(explicit_file: str | None = None, overrides: Mapping[str, str] | None = None,
         base: Config | None = None) -> Config:
    """Build the configuration of one mount from the file and ``-o`` overrides; with ``base`` (a running
    mount's configuration), the overrides apply to it and no file is read."""
    config = base or Config()
    path = None if base is not None else config_file_path(explicit_file)
    if path is not None:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path}: {exc}") from None
        section = data.get("datalakefs", data)
        config = apply(config, section)
    if overrides:
        config = apply(config, {k: v.replace(":", ",") if k in _LIST_KEYS else v for k, v in overrides.items()})
    return config


_LIST_KEYS = frozenset(
    name for name, hint in typing.get_type_hints(Config).items() if typing.get_origin(hint) is tuple
)
