"""The catalogue: what Rucio knows about DIDs, replicas and rules.

``base`` defines the :class:`~datalakefs.catalogue.base.Catalogue` protocol in our own types;
``rucio`` is the only module that imports rucio-clients; ``fake`` is an in-memory catalogue for
unit tests. Implementations are blocking: callers run them on worker threads, never on the trio
thread.
"""
