"""The demo lake's services, one module each: how each is configured, started and probed."""
