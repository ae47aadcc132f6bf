"""The error tree of datalakefs.

Every layer raises its own subclass of :class:`DatalakeError`; each carries the errno a POSIX caller
sees. The FUSE layer is the one place that turns them into ``pyfuse3.FUSEError``. Messages are meant
for logs and for ``user.datalakefs.state``: they never contain a token or a credential.
"""

from __future__ import annotations

import errno
from typing import Self

from datalakefs.redaction import redact_text


class DatalakeError(Exception):
    """Base class; ``errno`` is what a POSIX caller gets. Its text is scrubbed of credentials."""

    errno: int = errno.EIO

    def __init__(self, *args: object) -> None:
        super().__init__(*(redact_text(a) if isinstance(a, str) else a for a in args))

    def anew(self) -> Self:
        """A new exception of the same class and text, for each task that raises one failure several
        tasks share (a flight, a stream, a transfer): one instance raised by two tasks would share, and
        grow, one traceback."""
        return type(self)(*self.args)


class NotFoundError(DatalakeError):
    """No such DID, scope or path."""

    errno = errno.ENOENT


class NoAttributeError(DatalakeError):
    """An extended attribute the node does not have."""

    errno = errno.ENODATA


class CatalogueUnavailableError(DatalakeError):
    """The Rucio server could not be reached or answered with a server error."""

    errno = errno.EIO


class AccessDeniedError(DatalakeError):
    """The catalogue or the storage refused our credentials."""

    errno = errno.EACCES


class ReadOnlyError(DatalakeError):
    """A write outside the outbox."""

    errno = errno.EROFS


class NotSupportedError(DatalakeError):
    """The filesystem has no such feature (e.g. security labels or POSIX ACLs): ``EOPNOTSUPP``."""

    errno = errno.EOPNOTSUPP


class InvalidNameError(DatalakeError):
    """A name the catalogue's schema refuses."""

    errno = errno.EINVAL


class TransferError(DatalakeError):
    """Every replica of a file failed; the message lists why."""

    errno = errno.EIO


class ChecksumMismatchError(TransferError):
    """A complete file's checksum is not the catalogue's: the storage served other bytes. Its copy was
    dropped, and what the kernel kept of it must be too."""


class TryAgainError(DatalakeError):
    """The data is not ready yet (a rule is replicating) and the caller asked not to wait."""

    errno = errno.EAGAIN


class ConfigError(DatalakeError):
    """The configuration is invalid; the message names the option."""

    errno = errno.EINVAL


class SpoolFullError(DatalakeError):
    """The outbox spool disk is full (or below ``spool_reserve``): the write was not stored."""

    errno = errno.ENOSPC


class BusyError(DatalakeError):
    """The outbox file is being uploaded and cannot change now."""

    errno = errno.EBUSY


class AlreadyExistsError(DatalakeError):
    """The name is taken (an outbox file of the same DID name, an existing directory)."""

    errno = errno.EEXIST


class StorageConflictError(AlreadyExistsError):
    """The storage already holds an object at the URL, which this PUT did not write."""


class NotEmptyError(DatalakeError):
    """An outbox directory that still holds files."""

    errno = errno.ENOTEMPTY


class NotPermittedError(DatalakeError):
    """An operation the outbox does not support at all (hard links, symlinks, special files)."""

    errno = errno.EPERM


class CrossDeviceError(DatalakeError):
    """A rename the outbox cannot do in place (``mv`` then copies)."""

    errno = errno.EXDEV


class BadHandleError(DatalakeError):
    """A file handle the filesystem never gave out, or already released."""

    errno = errno.EBADF


class InvalidArgumentError(DatalakeError):
    """A call with a flag or argument the filesystem does not support (``EINVAL``)."""

    errno = errno.EINVAL
