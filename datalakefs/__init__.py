"""datalakefs: a Rucio data lake as a POSIX filesystem.

The notebook API (:mod:`datalakefs.api`) is available from here: ``datalakefs.stage(path, wait=True)``,
``state(path)``, ``replicas(path)``, ``outbox_status()``, ``status()``. It is loaded on first use, so
``import datalakefs`` stays cheap and needs neither the daemon's libraries nor ``pyfuse3``.
"""

from typing import Any

__version__ = "0.1.0"

_API = frozenset({"StagingError", "outbox_status", "replicas", "stage", "state", "status"})
__all__ = ["StagingError", "__version__", "outbox_status", "replicas", "stage", "state", "status"]


def __getattr__(name: str) -> Any:
    if name in _API:
        from datalakefs import api

        return getattr(api, name)
    raise AttributeError(f"module 'datalakefs' has no attribute {name!r}")
