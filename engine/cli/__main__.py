"""`python -m engine.cli`: the same as the `kontext` console script."""

from . import run

run()
