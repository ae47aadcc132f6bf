"""A real XRootD origin with XrdHttp for a test: files in a private directory, free loopback ports.

xrootd refuses to run as root, so as root it is started with ``-R xrootd`` and its directories are
handed to that user (they live under /tmp, not pytest's 0700 tmp dir, so that user can reach them).
It has no bind-address option: ``xrd.allow host localhost`` keeps it to loopback clients. It is
stopped by its PID and its directory removed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import IO

from datalakefs.demo.probes import free_port, wait_listening

CONFIG = """\
set odir = {data}
all.role server
all.export /
oss.localroot $(odir)
all.adminpath {run}
all.pidpath {run}
xrd.allow host localhost
xrd.port {xrd_port}
xrd.protocol XrdHttp:{http_port} libXrdHttp.so
xrootd.chksum adler32
"""


class XrootdOrigin:
    """``with XrootdOrigin(files) as origin: origin.url(name)``; needs the ``xrootd`` binary."""

    def __init__(self, files: Mapping[str, bytes]) -> None:
        self.files = files
        self.base = ""
        self._dir: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @staticmethod
    def available() -> bool:
        return shutil.which("xrootd") is not None

    def url(self, name: str) -> str:
        return f"{self.base}/{name}"

    def __enter__(self) -> XrootdOrigin:
        root = Path(tempfile.mkdtemp(prefix="dlfs-xrootd-"))
        root.chmod(0o755)
        self._dir = root
        data, run = root / "data", root / "run"
        data.mkdir()
        run.mkdir()
        for name, content in self.files.items():
            (data / name).write_bytes(content)
        xrd_port, http_port = free_port(), free_port()
        config = root / "origin.cfg"
        config.write_text(CONFIG.format(data=data, run=run, xrd_port=xrd_port, http_port=http_port))
        command = ["xrootd", "-c", str(config), "-n", "origin"]
        if os.geteuid() == 0:
            command[1:1] = ["-R", "xrootd"]
            shutil.chown(root, "xrootd", "xrootd")
            for path in (data, run, *data.iterdir()):
                shutil.chown(path, "xrootd", "xrootd")
        self._log = open(root / "origin.log", "wb")
        self._process = subprocess.Popen(command, cwd=run, stdout=subprocess.DEVNULL, stderr=self._log)
        try:
            wait_listening(http_port, self._process)
        except BaseException:
            self.__exit__()
            raise
        self.base = f"http://127.0.0.1:{http_port}"
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
