"""Keep one of the demo lake's servers running: start it again when it crashes (server venv).

XRootD 5.5.3's XCache (``libXrdPfc``, in ``XrdPfc::File::Sync``) dies of a segfault now and then
under storms of small reads, such as the benchmarks' 10,000-file reads (four such crashes in one
machine's ``dmesg``). A site runs such a server under systemd with ``Restart=on-failure``; the demo
lake runs it under this loop, which

* starts the command and waits for it;
* when it died of a signal (a crash, or the OOM killer), says so in its log and starts it again after
  a pause that doubles from 1 s up to 30 s (back to 1 s once it ran a minute), but gives up, exiting
  1, after more than ``MAX_CRASHES`` crashes within ``WINDOW`` seconds: a server that cannot stay up is
  a fault for ``demo status`` to show, not to hide;
* when it exited with a status (a bad configuration, a port in use), exits with that status:
  starting it again would not help;
* on SIGTERM or SIGINT (``demo down``) passes the signal on, waits for the server and exits 0.

Usage: ``supervise.py --name NAME -- COMMAND [ARGUMENT...]``. Standard library only.
"""

import argparse
import signal
import subprocess
import sys
import time

MAX_CRASHES = 5
WINDOW = 600.0  # seconds
PAUSE_FIRST = 1.0
PAUSE_MAX = 30.0
STEADY = 60.0  # a server that ran this long before its crash starts again after the first pause


def _say(name: str, text: str) -> None:
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} supervise {name}: {text}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command to supervise")

    stopping = False
    server: subprocess.Popen[bytes] | None = None

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        if server is not None and server.poll() is None:
            server.send_signal(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    crashes: list[float] = []
    pause = PAUSE_FIRST
    while True:
        began = time.monotonic()
        server = subprocess.Popen(command)
        if stopping:  # the signal came while it was being started
            server.terminate()
        status = server.wait()
        if stopping:
            return 0
        if status >= 0:
            _say(args.name, f"exited with status {status}; not started again")
            return status
        now = time.monotonic()
        crashes = [t for t in crashes if now - t < WINDOW] + [now]
        reason = signal.Signals(-status).name
        if len(crashes) > MAX_CRASHES:
            _say(args.name, f"died of {reason}, {len(crashes)} crashes in {WINDOW:.0f} s: giving up")
            return 1
        if now - began >= STEADY:
            pause = PAUSE_FIRST
        _say(args.name, f"died of {reason} (pid {server.pid}); starting it again in {pause:.0f} s")
        deadline = now + pause
        while not stopping and time.monotonic() < deadline:
            time.sleep(0.1)
        if stopping:
            return 0
        pause = min(2 * pause, PAUSE_MAX)


if __name__ == "__main__":
    sys.exit(main())
