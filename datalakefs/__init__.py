"""datalakefs: a Rucio data lake as a POSIX filesystem."""

__version__ = "0.1.0"
