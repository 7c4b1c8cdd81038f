"""`python benchmarks/bench.py [options]` is `kontext bench [options]` (no console script needed).

The benchmark itself lives in engine/bench/ (the installed package ships only `engine`); this folder keeps
the measured results (benchmarks/results/<device>/<date>/) and thin scripts like this one.
"""

from __future__ import annotations

import sys

from engine.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
