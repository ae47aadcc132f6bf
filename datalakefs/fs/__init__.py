"""The filesystem in domain terms: lookup, getattr, readdir, open, read, xattrs, writes.

No pyfuse3 here: the FUSE layer converts types and carries errnos; everything that decides what a
POSIX call does lives in this package, so it is tested without mounting anything.
"""
