"""Transport: how bytes come from storage. The only package that imports aiohttp.

``aio_bridge`` runs aiohttp on a uvloop event loop in a dedicated thread and lets trio await work there;
``http`` performs closed-range GETs whose bodies are written to a sink on that thread; ``replicas`` turns
a file's replicas and the configuration into the ordered list of URLs to try (XCache first).
"""
