"""The namespace: how the catalogue's DIDs become a tree of inodes.

``escaping`` maps DID names to file-name components and back; ``inodes`` is the inode table (no I/O,
lookup counts until FORGET); ``tree`` resolves lookups and listings through the cached catalogue.
"""
