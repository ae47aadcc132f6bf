"""Probes of the lake's ports: is a port taken, by whom, does a service answer; port reservation."""

from __future__ import annotations

import re
import shutil
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Final

from datalakefs.demo.layout import ProgressFn

RESERVED_PORTS: Final = Path("/proc/sys/net/ipv4/ip_local_reserved_ports")


def reserve_ports(first: int, last: int, progress: ProgressFn, reserved: Path = RESERVED_PORTS) -> None:
    """Keep the kernel from handing the lake's ports to outgoing connections.

    The default port bases lie inside Linux's ephemeral range (32768-60999): any client socket may
    be given one of the lake's ports and make a service fail to bind. As root, the range is added to
    ``ip_local_reserved_ports`` (kept until reboot; listening on a reserved port still works).
    """
    try:
        current = reserved.read_text().strip()
    except OSError:
        return
    wanted = {*range(first, last + 1)}
    for part in filter(None, current.split(",")):
        low, _, high = part.partition("-")
        wanted -= {*range(int(low), int(high or low) + 1)}
    if not wanted:
        return
    try:
        reserved.write_text(",".join(filter(None, [current, f"{first}-{last}"])) + "\n")
    except OSError as exc:
        progress(f"ports {first}-{last} could not be reserved ({exc.strerror}); "
                 "a client socket may take one of them")
        return
    progress(f"reserved ports {first}-{last} against outgoing connections")


def port_in_use(port: int) -> bool:
    """True when something listens on ``port`` at 127.0.0.1 or at the wildcard address."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def who_listens(port: int) -> str:
    """Best effort: the `ss` description of the listener on ``port`` ('' when unknown)."""
    ss = shutil.which("ss")
    if ss is None:
        return ""
    out = subprocess.run([ss, "-Hltnp", f"sport = :{port}"], capture_output=True, text=True, check=False).stdout
    users = re.search(r"users:\((.*)\)", out)
    return users.group(1) if users else ""


def tcp_open(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


def free_port() -> int:
    """A port nothing listens on at 127.0.0.1 now, for a helper process told to listen there."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_listening(port: int, process: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    """Wait until ``process`` listens on ``port`` at 127.0.0.1; RuntimeError when it exits first or
    ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while not tcp_open(port, timeout=0.2):
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode} before listening on {port}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{process.args!r} did not listen on {port} within {timeout:g} s")
        time.sleep(0.05)


# the lake is on loopback: never route a probe through the caller's HTTP proxy
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_ok(url: str, timeout: float = 3.0, ca_file: Path | None = None) -> bool:
    """True when ``url`` answers below 500; https is verified against ``ca_file``."""
    opener = _DIRECT
    if ca_file is not None:
        context = ssl.create_default_context(cafile=str(ca_file))
        tls = urllib.request.HTTPSHandler(context=context)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), tls)
    try:
        with opener.open(url, timeout=timeout) as resp:
            return bool(resp.status < 500)
    except urllib.error.HTTPError as err:
        with err:  # closes its connection
            return err.code < 500
    except (OSError, ValueError):
        return False
