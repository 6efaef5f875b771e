"""`python -m meddx ...`: the same as the `meddx` command."""

from meddx.cli import run

run()
