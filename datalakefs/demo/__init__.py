"""The local data lake (SPEC §8): `datalakefs demo` and the integration test suite's fixture.

Tooling, not part of the filesystem: nothing under datalakefs imports this package except the CLI.
``lake`` runs the processes, ``seed`` fills the catalogue, ``status`` holds the value types that
`datalakefs demo status --json` prints, ``command`` is the argparse front end, and ``assets/`` holds
what runs inside the Rucio server venv or as separate processes.
"""
