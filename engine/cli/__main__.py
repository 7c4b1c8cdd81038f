"""`python -m engine.cli`: the same as the `kontext` console script."""

import sys

from . import main

sys.exit(main())
