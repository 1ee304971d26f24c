"""``python -m mtmerge.demo``: the same as ``mtmerge demo``."""

import sys

from mtmerge.demo.command import main

sys.exit(main())
