"""Listing an S3 prefix of N objects against moto's S3 server: the ListObjectsV2 requests
it takes and its wall time, walked in one process and split over parallel Ray tasks.

    python benchmarks/s3_listing.py --objects 100000 --prefixes 100

The objects (a few bytes each) sit under PREFIXES sub-prefixes of one input prefix, as
an archive is laid out by date or by site. Both ways are run in one process, side by
side: ``listing.list_table`` with ``prefixes.PARALLEL_PREFIXES`` set past the sub-prefixes (one
paged walk in the driver), then with Ray up (one delimited page in the driver, one
walk per sub-prefix in a task). Requests are counted with botocore's event hook in the
driver; a task's walk is the same code, so the one-walk count is the total either way.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import time
import uuid

from record import log, machine, write_result

from meddx.inputs import listing, prefixes, storage
from meddx.inputs.storage import StorageSettings
from meddx.pipelines import cluster
from meddx.pipelines.local_s3 import s3_server

PUT_BATCH = 5_000  # objects per s3fs pipe() call while the archive is written


def count_requests(fs) -> list[str]:
    calls: list[str] = []
    fs.s3.meta.events.register(
        "before-call.s3.ListObjectsV2", lambda **kwargs: calls.append("ListObjectsV2")
    )
    return calls


def main(args: argparse.Namespace) -> None:
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    with s3_server() as url:
        settings = StorageSettings(s3_endpoint=url)
        bucket = f"listing-{uuid.uuid4().hex[:8]}"
        fs = storage.filesystem(f"s3://{bucket}", settings)
        fs.mkdir(bucket)
        log(f"writing {args.objects:,} objects under {args.prefixes} sub-prefixes")
        start = time.perf_counter()
        names = [
            f"{bucket}/archive/site-{i % args.prefixes:04d}/cxr-{i:08d}.dcm"
            for i in range(args.objects)
        ]
        for at in range(0, len(names), PUT_BATCH):
            fs.pipe({name: b"x" for name in names[at : at + PUT_BATCH]})
        written = time.perf_counter() - start
        prefix = f"s3://{bucket}/archive"

        fs.invalidate_cache()
        calls = count_requests(storage.filesystem(prefix, settings))
        prefixes.PARALLEL_PREFIXES, parallel_at = args.prefixes + 1, prefixes.PARALLEL_PREFIXES
        start = time.perf_counter()
        walked = listing.list_table(prefix, settings)
        one_walk = {"seconds": round(time.perf_counter() - start, 2), "requests": len(calls)}
        prefixes.PARALLEL_PREFIXES = parallel_at

        cluster.init_ray()
        fs.invalidate_cache()
        calls.clear()
        start = time.perf_counter()
        split = listing.list_table(prefix, settings)
        parallel = {
            "seconds": round(time.perf_counter() - start, 2),
            "driver_requests": len(calls),
        }
        if not split.equals(walked) or walked.num_rows != args.objects:
            raise RuntimeError("the two listings differ")
        log(f"one walk {one_walk}, parallel tasks {parallel}")
        write_result(
            {
                "benchmark": "s3_listing",
                "date": dt.date.today().isoformat(),
                "model": "moto",
                "objects": args.objects,
                "prefixes": args.prefixes,
                "machine": machine(),
                "write_seconds": round(written, 1),
                "one_walk": one_walk,
                "parallel_tasks": parallel,
                "store": "moto server on loopback",
            },
            "s3-listing-",
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--objects", type=lambda v: int(float(v)), default=100_000)
    parser.add_argument("--prefixes", type=int, default=100)
    main(parser.parse_args())
