"""Configuration: file, -o overrides, sizes, and clear errors for bad input."""

import json
from pathlib import Path

import pytest

from datalakefs import config
from datalakefs.errors import ConfigError


def test_defaults_without_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("DATALAKEFS_CONFIG", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    loaded = config.load()
    assert loaded.block_size == 1 << 20
    assert loaded.staging == "stream"


def test_file_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('cache_size = "2G"\nscopes = ["a", "b"]\nxcache = "http://127.0.0.1:1"\n')
    loaded = config.load(str(path), config.parse_mount_options("cache_size=512M,allow_other,scopes=c:d"))
    assert loaded.cache_size == 512 << 20
    assert loaded.allow_other is True
    assert loaded.scopes == ("c", "d")
    assert loaded.xcache == "http://127.0.0.1:1"


def test_env_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[datalakefs]\nstaging = \"rule\"\n")
    monkeypatch.setenv("DATALAKEFS_CONFIG", str(path))
    assert config.load().staging == "rule"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ("no_such_option=1", "unknown option 'no_such_option'"),
        ("staging=sometimes", "not one of"),
        ("cache_size=lots", "is not a size"),
        ("allow_other=maybe", "is not a boolean"),
        ("http_retries=two", "is not a valid int"),
    ],
)
def test_bad_options_name_the_key(options: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config.load(None, config.parse_mount_options(options))


def test_missing_named_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(str(tmp_path / "nope.toml"))


def test_broken_toml_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("cache_size = = 3\n")
    with pytest.raises(ConfigError, match=str(path)):
        config.load(str(path))


@pytest.mark.parametrize(("text", "mask"), [("022", 0o022), ("0o002", 0o002), ("077", 0o077), ("0", 0)])
def test_umask_is_octal(text: str, mask: int) -> None:
    assert config.load(None, {"umask": text}).umask == mask


@pytest.mark.parametrize("text", ["9", "1000", "rwx"])
def test_bad_umask_is_refused(text: str) -> None:
    with pytest.raises(ConfigError, match="umask"):
        config.load(None, {"umask": text})


def test_ownership_options() -> None:
    loaded = config.load(None, {"uid": "1000", "gid": "100", "ro": "true"})
    assert (loaded.uid, loaded.gid, loaded.ro) == (1000, 100, True)


def test_as_dict_round_trips() -> None:
    changed = config.load(None, {"scopes": "a,b", "spool_dir": "/x", "umask": "002", "ro": "true", "uid": "7"})
    assert config.apply(config.Config(), json.loads(json.dumps(changed.as_dict()))) == changed


@pytest.mark.parametrize(("text", "seconds"), [("90", 90.0), ("1.5", 1.5), ("30s", 30.0), ("5m", 300.0),
                                               ("2h", 7200.0), ("7d", 604800.0), ("1h30m", 5400.0),
                                               ("250ms", 0.25)])
def test_durations_take_suffixes(text: str, seconds: float) -> None:
    assert config.duration(text) == seconds
    assert config.load(None, {"staging_timeout": text}).staging_timeout == seconds


def test_an_integer_duration_option_stays_an_integer() -> None:
    assert config.load(None, {"rule_lifetime": "2h"}).rule_lifetime == 7200


@pytest.mark.parametrize("text", ["5x", "m", "5m3", "-5s", "1h 30m"])
def test_bad_durations_are_refused_with_the_option_name(text: str) -> None:
    with pytest.raises(ConfigError, match=r"option staging_timeout: .* duration"):
        config.load(None, {"staging_timeout": text})


def test_systemd_directories_are_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/datalakefs/lake")
    monkeypatch.setenv("CACHE_DIRECTORY", "/var/cache/datalakefs/lake:/var/cache/other")
    defaults = config.Config()
    assert defaults.state_dir == Path("/var/lib/datalakefs/lake")
    assert defaults.cache_dir == Path("/var/cache/datalakefs/lake")
