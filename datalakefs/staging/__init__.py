"""Getting file bytes to readers: stream mode (``stream``: range reads into the block cache), rule
staging and the policy that picks one per file."""
