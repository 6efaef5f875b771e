"""Nightly screening under Ray Jobs: same options as `meddx screen`.

    ray job submit --submission-id nightly-2026-11-26 --working-dir . -- \
        python jobs/nightly.py s3://pacs-export/cxr --model s3://models/cxr.pt --out s3://results
"""

import os
import sys

# Under `ray job submit` the working dir is the cwd, but python puts jobs/ on sys.path.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from meddx.cli import run  # noqa: E402

if __name__ == "__main__":
    run(["screen", *sys.argv[1:]])
