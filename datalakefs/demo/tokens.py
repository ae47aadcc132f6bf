"""The demo lake's offline token issuer: its key, scitokens-cpp's key cache, and minting.

The issuer (``assets/token_kit.py``, run with the server venv's Python) is never contacted over the
network: the token origin finds its keys in a pre-filled key cache, and the WebDAV authoriser reads
the public key from the issuer's key file.
"""

from __future__ import annotations

import subprocess
from typing import Final

from datalakefs.demo.layout import TOKEN_AUDIENCE, TOKEN_ISSUER, DemoError, Layout
from datalakefs.demo.processes import chown, clean_env, write_atomic

#: what `datalakefs demo token` mints unless told otherwise: read everything, write SCRATCH
DEFAULT_SCOPE: Final = "storage.read:/ storage.create:/SCRATCH storage.modify:/SCRATCH"
#: the FTS shim's token: it copies into any RSE of the tree
SERVICE_SCOPE: Final = "storage.read:/ storage.create:/ storage.modify:/"
SERVICE_LIFETIME: Final = 90 * 86400
USER_LIFETIME: Final = 7 * 86400


def init_issuer(layout: Layout, xrootd_user: str | None) -> None:
    """Create the issuer's key unless it exists and load its public key into the key cache."""
    keycache = layout.token_cache / "scitokens" / "scitokens_cpp.sqllite"
    subprocess.run(
        [str(layout.venv / "bin" / "python"), str(layout.lib / "token_kit.py"), "init",
         "--key", str(layout.token_key), "--keycache", str(keycache), "--issuer", TOKEN_ISSUER],
        capture_output=True,
        check=True,
        env=clean_env(),
    )
    for path in (keycache.parent, keycache):
        chown(path, xrootd_user)


def token_command(layout: Layout) -> tuple[str, ...]:
    """argv that prints a valid bearer token of the lake's issuer; append ``--expired``,
    ``--wrong-key``, ``--lifetime N`` or ``--scope S`` for other tokens."""
    return (
        str(layout.venv / "bin" / "python"),
        str(layout.lib / "token_kit.py"),
        "mint",
        "--key",
        str(layout.token_key),
        "--issuer",
        TOKEN_ISSUER,
        "--audience",
        TOKEN_AUDIENCE,
    )


def mint(layout: Layout, *options: str) -> str:
    """A token minted with ``options`` (see :func:`token_command`)."""
    done = subprocess.run([*token_command(layout), *options], capture_output=True, text=True, check=False,
                          env=clean_env())
    if done.returncode != 0:
        raise DemoError(f"could not mint a token (is the lake up?): {done.stderr.strip()[-500:]}")
    return done.stdout.strip()


def write_service_token(layout: Layout) -> None:
    """The FTS shim's token file (0600), minted anew at every `up`."""
    token = mint(layout, "--scope", SERVICE_SCOPE, "--lifetime", str(SERVICE_LIFETIME))
    write_atomic(layout.service_token, token + "\n", 0o600)


def write_user_token(layout: Layout) -> None:
    """The token `datalakefs demo mount` presents (``DEFAULT_SCOPE``, a week), minted anew each time."""
    token = mint(layout, "--scope", DEFAULT_SCOPE, "--lifetime", str(USER_LIFETIME))
    write_atomic(layout.user_token, token + "\n", 0o600)
