"""Flaky object storage: throttling, 5xx, dropped connections and a 403, over real HTTP.

A fault-injecting proxy (tests/s3_faults.py) sits in front of the moto server; meddx is
given the proxy's URL as its S3 endpoint, so the driver, the Ray workers and the
predictor actors all meet the faults. Transient faults must be retried with backoff
(botocore's standard mode, then s3fs's own loop for bodies cut short); a permanent 403
is one error row.
"""

from __future__ import annotations

import os
import subprocess

import pyarrow.dataset as pads
import pytest

from meddx import MeddxError
from meddx.inputs.listing import list_table
from meddx.inputs.reading import read_object
from meddx.inputs.storage import StorageSettings, arrow_filesystem, filesystem

from .helpers import MEDDX
from .images import make_tar, png
from .s3_faults import FaultRules, FaultyS3Proxy

# Each fault twice in a row, for every method a key sees (HEAD, GET, ranged GETs).
TRANSIENT = {
    "slowdown": ["503", "503"],
    "internal": ["500", "500"],
    "reset": ["reset", "reset"],
    "cut": ["truncate", "truncate"],
    "mixed": ["503", "reset", "500"],
}


@pytest.fixture
def faulty_s3(s3_endpoint):
    """The proxy on a free loopback port in front of moto; rules are set by the test."""
    with FaultyS3Proxy(s3_endpoint) as proxy:
        yield proxy


def test_listing_and_reads_survive_transient_faults(bucket, settings, faulty_s3):
    root = bucket.removeprefix("s3://")
    fs = filesystem(bucket, settings)
    for i in range(3):
        fs.pipe_file(f"{root}/in/a/{i}.png", png("L", size=40 + i))
    fs.pipe_file(f"{root}/in/b/cut.png", png("L", size=60))
    # Every listing and every object: one 503, then a reset, before the answer.
    faulty_s3.rules = FaultRules(transient={"cut": ["truncate"]}, default=["503", "reset"])
    via_proxy = StorageSettings(s3_endpoint=faulty_s3.url)

    uris = list_table(f"{bucket}/in", via_proxy)["image_uri"].to_pylist()
    assert uris == [f"{bucket}/in/a/{i}.png" for i in range(3)] + [f"{bucket}/in/b/cut.png"]
    assert [read_object(u, via_proxy) for u in uris] == [
        (png("L", size=40 + i), "") for i in range(3)
    ] + [(png("L", size=60), "")]
    listings = [key for method, key, _ in faulty_s3.log if "?list=" in key]
    assert len(listings) >= 2, faulty_s3.log  # the listing itself met both faults
    assert faulty_s3.injected["truncate"] >= 1 and faulty_s3.injected["reset"] >= 4


def test_denied_listing_is_one_clear_line(bucket, settings, faulty_s3):
    filesystem(bucket, settings).pipe_file(f"{bucket.removeprefix('s3://')}/secret/x.png", b"x")
    faulty_s3.rules = FaultRules(denied=("secret",))
    with pytest.raises(MeddxError, match=r"^cannot list .*/secret: access denied$"):
        list_table(f"{bucket}/secret", StorageSettings(s3_endpoint=faulty_s3.url))


@pytest.mark.slow
def test_flaky_store_still_one_row_per_object(
    ray_session, bucket, settings, faulty_s3, random_checkpoint
):
    root = bucket.removeprefix("s3://")
    fs = filesystem(bucket, settings)
    expected_ok = []
    for kind in TRANSIENT:
        for i in range(2):
            key = f"in/{kind}-{i}.png"
            fs.pipe_file(f"{root}/{key}", png("L", size=40 + i))
            expected_ok.append(f"{bucket}/{key}")
    for i in range(6):
        fs.pipe_file(f"{root}/in/plain/{i}.png", png("L", size=48 + i))
        expected_ok.append(f"{bucket}/in/plain/{i}.png")
    # A tar shard is read in ranged GETs through a file object: cut bodies mid-stream.
    members = [(f"m{i}.png", png("L", size=44 + i)) for i in range(3)]
    fs.pipe_file(f"{root}/in/cut-shard.tar", make_tar(members))
    expected_ok += [f"{bucket}/in/cut-shard.tar#m{i}.png" for i in range(3)]
    fs.pipe_file(f"{root}/in/forbidden.png", png("L"))
    fs.put_file(random_checkpoint[0], f"{root}/models/m.pt")
    # Every other request path (listing, checkpoint, Parquet writes) gets one 503 first.
    faulty_s3.rules = FaultRules(transient=TRANSIENT, denied=("forbidden",), default=["503"])

    where = [f"{bucket}/in", "--model", f"{bucket}/models/m.pt", "--out", f"{bucket}/out"]
    options = ["--run-date", "2026-04-01", "--batch-size", "4", "--s3-endpoint", faulty_s3.url]
    result = subprocess.run(
        [MEDDX, "score", *where, *options],
        env={
            **os.environ,
            "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address,
            "MEDDX_QUIET_WORKERS": "1",
        },
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    n = len(expected_ok) + 1  # rows: every object, the shard's members, the denied one
    assert f"inputs={n - 2} ok={n - 1} errors=1 rows_written={n}" in result.stdout

    # Read the results straight from moto, not through the faults.
    table = pads.dataset(
        f"{root}/out",
        filesystem=arrow_filesystem(bucket, settings),
        format="parquet",
        partitioning="hive",
    ).to_table()
    uris = table["image_uri"].to_pylist()
    assert len(uris) == len(set(uris)) == n
    rows = {r["image_uri"]: r for r in table.to_pylist()}
    assert {u for u, r in rows.items() if r["status"] == "ok"} == set(expected_ok)
    denied = rows[f"{bucket}/in/forbidden.png"]
    assert (denied["status"], denied["error"]) == ("error", "access denied")

    # The faults really happened, to the objects they were meant for, in every process.
    faulted = {key for _, key, _ in faulty_s3.log}
    for kind in TRANSIENT:
        assert {f"{root}/in/{kind}-0.png", f"{root}/in/{kind}-1.png"} <= faulted, kind
    assert ("GET", f"{root}/in/cut-shard.tar", "truncate") in faulty_s3.log
    assert f"{root}/models/m.pt" in faulted  # driver and predictor both read it
    assert any(key.startswith(f"{root}/out/") for key in faulted)  # the Parquet writes
    assert any("?list=" in key for key in faulted)
    assert {"503", "500", "reset", "truncate", "403"} <= set(faulty_s3.injected)
