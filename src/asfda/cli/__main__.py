"""``python -m asfda.cli``: the ``asfda`` command line."""

import sys

from asfda.cli import main

if __name__ == "__main__":  # importing the module (pkgutil, documentation builders) starts nothing
    sys.exit(main())
