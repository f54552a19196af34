"""``python -m asfda``: the same command line as the ``asfda`` script (and what ``torchrun -m asfda`` runs)."""

import sys

from asfda.cli import main

if __name__ == "__main__":  # importing the module (pkgutil, documentation builders) starts nothing
    sys.exit(main())
