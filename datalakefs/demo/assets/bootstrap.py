"""Create the Rucio schema, the base VO and the root account (runs in the server venv, once per database).

Called by `datalakefs demo up` with RUCIO_CONFIG pointing at the server config, right after the
PostgreSQL database was created. The same three calls as rucio's own tools/bootstrap.py:
build_database() needs `[alembic] cfg` (only to stamp the head revision), create_base_vo() makes
VO 'def' (without it add_scope fails with VONotFound), create_root_account() adds account root
with the userpass identity of `[bootstrap]` (plaintext password: rucio salts and hashes it).
"""

import sys

from rucio.db.sqla.util import build_database, create_base_vo, create_root_account


def main() -> int:
    build_database()
    create_base_vo()
    create_root_account()
    return 0


if __name__ == "__main__":
    sys.exit(main())
