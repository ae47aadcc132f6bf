"""``python -m datalakefs`` is the ``datalakefs`` command."""

import sys

from datalakefs.cli import main

sys.exit(main())
