"""``python -m jaxinfra ...``: the same commands as the ``jaxinfra`` script."""

import sys

from jaxinfra.cli import main

sys.exit(main())
