"""``python -m mtmerge ...`` runs the ``mtmerge`` command."""

import sys

from mtmerge.cli import main

if __name__ == "__main__":
    sys.exit(main())
