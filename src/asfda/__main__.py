"""``python -m asfda``: the same command line as the ``asfda`` script (and what ``torchrun -m asfda`` runs)."""

import sys

from asfda.cli import main

sys.exit(main())
