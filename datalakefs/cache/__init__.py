"""The on-disk block cache: verified, bounded, surviving restarts.

``layout`` defines the cache key, the directory layout and the journal format; ``writer`` turns an HTTP
body into cached blocks on the transport's thread; ``store`` is the :class:`BlockCache` itself (index,
verified reads, LRU eviction, accounting, whole-file verification).
"""
