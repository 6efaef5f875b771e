"""`ray job submit --working-dir . -- python jobs/score.py ...`: same options as `meddx score`."""

import os
import sys

# Under `ray job submit` the working dir is the cwd, but python puts jobs/ on sys.path.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from meddx.cli import run  # noqa: E402

if __name__ == "__main__":
    run(["score", *sys.argv[1:]])
