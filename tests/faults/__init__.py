"""Test origins: an in-process HTTP origin that injects faults, and a real XrdHttp origin launcher."""
