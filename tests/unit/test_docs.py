"""docs/CONFIGURATION.md lists every option of config.Config with its true default."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any

import pytest

from datalakefs.config import Config

DOC = Path(__file__).resolve().parents[2] / "docs" / "CONFIGURATION.md"
ROW = re.compile(r"^\| `([a-z_]+)` \| `([^`]*)` \|", re.MULTILINE)


def rendered(name: str, value: Any) -> str:
    if name == "umask":  # a mask is written in octal
        return f"{value:03o}"
    if value is None:
        return "None"
    if isinstance(value, tuple):
        return ",".join(value) if value else "(empty)"
    if isinstance(value, Path):
        return str(value).replace(os.path.expanduser("~"), "~", 1)
    return str(value)


def test_every_option_is_documented_with_its_default(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("XDG_CACHE_HOME", "XDG_STATE_HOME"):  # the documented defaults are without them
        monkeypatch.delenv(name, raising=False)
    documented = dict(ROW.findall(DOC.read_text()))
    defaults = Config()
    expected = {f.name: rendered(f.name, getattr(defaults, f.name)) for f in dataclasses.fields(Config)}
    assert sorted(set(expected) - set(documented)) == [], "options missing from docs/CONFIGURATION.md"
    assert sorted(set(documented) - set(expected)) == [], "documented options that config.py does not have"
    wrong = {name: (documented[name], default) for name, default in expected.items() if documented[name] != default}
    assert wrong == {}, "documented default differs from config.py (documented, real)"
