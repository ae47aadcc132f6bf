"""The one CA policy of storage requests: which servers to trust, and which client certificate to show.

Trusted: the system's CAs, plus the grid CA directory ``$X509_CERT_DIR`` when set (IGTF CAs, hashed
as ``openssl rehash`` names them), plus ``storage_ca_bundle`` (a PEM file) when configured. Reads
(aiohttp, on the asyncio thread) and writes (``storage.py``, in worker threads) get their contexts
here, so one storage server is trusted, or not, the same way by both.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from pathlib import Path

from datalakefs.errors import ConfigError


def client_context(
    environ: Mapping[str, str], ca_bundle: str | None = None, certificate: Path | None = None
) -> ssl.SSLContext:
    """A verifying TLS client context; ``certificate``: a PEM holding a certificate chain and its key
    (an X509 proxy) to present."""
    context = ssl.create_default_context()
    cert_dir = environ.get("X509_CERT_DIR")
    if cert_dir and os.path.isdir(cert_dir):
        context.load_verify_locations(capath=cert_dir)
    if ca_bundle:
        try:
            context.load_verify_locations(cafile=ca_bundle)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"storage_ca_bundle {ca_bundle} cannot be used: {exc}") from None
    if certificate is not None:
        try:
            context.load_cert_chain(str(certificate))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"X509 proxy {certificate} cannot be used as client certificate: {exc}") from None
    return context
