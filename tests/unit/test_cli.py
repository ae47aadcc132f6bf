"""The command line's own behaviour (issue 15): demo --help, flag forms of mount options, shell
completion, durations, journald priorities and the log destination."""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from datalakefs.cli import _parser, main
from datalakefs.cli.common import load_config
from datalakefs.cli.logs import KeyValueFormatter, log_destination, to_journal
from datalakefs.fuse.session import mount_of


def test_demo_help_is_the_demo_tooling_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["demo", "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: datalakefs demo") and "tour" in out


def test_flag_forms_are_the_same_as_their_o_forms() -> None:
    args = _parser().parse_args(["mount", "/mnt", "--read-only", "--allow-other", "--cache-dir", "/var/c",
                                 "--cache-size", "5G", "--uid", "1000", "--gid", "100", "--umask", "002",
                                 "-o", "log_level=debug"])
    args.config = os.devnull
    config = load_config(args)
    assert (config.ro, config.allow_other, str(config.cache_dir), config.cache_size) == (True, True, "/var/c", 5 << 30)
    assert (config.uid, config.gid, config.umask, config.log_level) == (1000, 100, 0o002, "debug")


def test_a_flag_value_with_a_comma_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _parser().parse_args(["mount", "/mnt", "--cache-dir", "/a,b"])
    assert "contains a comma" in capsys.readouterr().err


def test_stage_timeout_takes_a_duration(capsys: pytest.CaptureFixture[str]) -> None:
    assert _parser().parse_args(["stage", "s:n", "--wait", "--timeout", "5m"]).timeout == 300.0
    with pytest.raises(SystemExit):
        _parser().parse_args(["stage", "s:n", "--timeout", "soon"])
    assert "invalid duration value" in capsys.readouterr().err


@pytest.mark.parametrize("shell", ["bash", "zsh"])
def test_completion_knows_every_command_and_flag(shell: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["completion", shell]) == 0
    script = capsys.readouterr().out
    for word in ("mount", "umount", "stage", "outbox", "cache", "status", "demo", "--read-only", "--cache-dir"):
        assert word in script, word


def test_bash_completion_completes_in_bash(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    main(["completion", "bash"])
    script = tmp_path / "datalakefs.bash"
    script.write_text(capsys.readouterr().out)
    probe = (f"source {script}; COMP_WORDS=(datalakefs mount /mnt --read); COMP_CWORD=3; "
             "_shtab_datalakefs; echo ${COMPREPLY[@]}")
    done = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["--read-only"]


def test_lines_carry_journald_priorities_only_under_systemd() -> None:
    record = logging.LogRecord("datalakefs", logging.WARNING, __file__, 1, "event=x", None, None)
    assert KeyValueFormatter(journal=True).format(record).startswith("<4>ts=")
    assert KeyValueFormatter().format(record).startswith("ts=")


def test_the_journal_stream_is_recognised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with open(tmp_path / "stream", "w") as stream:
        st = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        assert to_journal(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino + 1}")
        assert not to_journal(stream.fileno())


def test_the_log_destination_is_the_file_stderr_goes_to(tmp_path: Path) -> None:
    log = tmp_path / "daemon.log"
    code = "from datalakefs.cli.logs import log_destination; print(log_destination())"
    with open(log, "w") as stderr:
        done = subprocess.run([sys.executable, "-c", code], stderr=stderr, capture_output=False, check=True,
                              stdout=subprocess.PIPE, text=True, env={k: v for k, v in os.environ.items()
                                                                       if k != "JOURNAL_STREAM"})
    assert done.stdout.strip() == str(log)
    assert log_destination()  # this process's: whatever pytest made stderr


def test_a_path_outside_any_mount_has_no_mount(tmp_path: Path) -> None:
    assert mount_of(str(tmp_path)) is None
    assert mount_of(str(tmp_path / "missing")) is None


def test_cache_of_a_path_outside_any_mount_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["cache", "stats", str(tmp_path), "--config", os.devnull]) == 2
    assert "is not under a running datalakefs mount" in capsys.readouterr().err


def test_every_command_module_registers(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(name in out for name in ("mount", "stage", "completion", "demo"))
    assert isinstance(_parser(), argparse.ArgumentParser)
