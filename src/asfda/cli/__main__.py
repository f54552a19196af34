"""``python -m asfda.cli``: the ``asfda`` command line."""

import sys

from asfda.cli import main

sys.exit(main())
