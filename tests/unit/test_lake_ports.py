"""The demo lake keeps its port block out of the kernel's ephemeral range."""

from __future__ import annotations

from pathlib import Path

from datalakefs.demo.probes import reserve_ports


def test_the_port_block_is_added_once_to_the_reserved_list(tmp_path: Path) -> None:
    reserved = tmp_path / "ip_local_reserved_ports"
    reserved.write_text("8080,9000-9005\n")
    said: list[str] = []
    reserve_ports(39000, 39018, said.append, reserved)
    assert reserved.read_text() == "8080,9000-9005,39000-39018\n"
    reserve_ports(39000, 39018, said.append, reserved)
    assert reserved.read_text() == "8080,9000-9005,39000-39018\n"
    assert len(said) == 1


def test_an_empty_list_and_a_missing_one(tmp_path: Path) -> None:
    reserved = tmp_path / "ip_local_reserved_ports"
    reserved.write_text("\n")
    reserve_ports(40000, 40018, [].append, reserved)
    assert reserved.read_text() == "40000-40018\n"
    said: list[str] = []
    reserve_ports(38000, 38018, said.append, tmp_path / "missing")
    assert said == []
