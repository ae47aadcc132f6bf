"""``python hung_fs.py [--ignore-sigterm] [...] MOUNTPOINT``: a FUSE filesystem whose statfs never
answers (a wedged daemon).

Prints ``ready`` once mounted. Used to check that a mount that does not answer is recognised and
aborted instead of hanging whoever asks it. With ``--ignore-sigterm`` it also stands in for a daemon
that does not stop (arguments other than the last are ignored, so it can replace ``datalakefs``).
"""

from __future__ import annotations

import signal
import sys

import pyfuse3
import trio


class NeverAnswers(pyfuse3.Operations):
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        await trio.sleep_forever()
        raise AssertionError("unreachable")


def main(mountpoint: str) -> None:
    pyfuse3.init(NeverAnswers(), mountpoint, {"fsname=hungfs", "subtype=hungfs"})
    print("ready", flush=True)
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=False)


if __name__ == "__main__":
    if "--ignore-sigterm" in sys.argv:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    main(sys.argv[-1])
