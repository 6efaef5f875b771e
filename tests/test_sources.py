"""Inputs as hospitals hold them: tar shards and manifests, from a real S3 endpoint."""

import datetime as dt
import io

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from meddx import MeddxError
from meddx.inputs import listing, reading, shards
from meddx.inputs.listing import labelled_inputs, list_inputs, manifest_labels
from meddx.inputs.reading import KNOWN_SEPARATOR, read_objects
from meddx.inputs.storage import StorageSettings, arrow_filesystem, filesystem
from meddx.pipelines.scoring import ScoreConfig, score

from .images import dicom_cr, make_tar, png


def good_shard() -> bytes:
    members = []
    for i in range(4):
        members += [(f"sample{i:03d}.png", png("L", size=40 + i)), (f"sample{i:03d}.cls", b"1")]
    members += [
        ("sample004.dcm", dicom_cr()),
        ("corrupt.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 50),
        ("../../escape.png", png("L")),
        ("/abs/path.jpg", png("RGB")),
        ("._hidden.png", png("L")),
        ("notes.json", b"{}"),
    ]
    return make_tar(members, symlink="link.png")


def truncated_shard() -> bytes:
    full = make_tar([(f"t{i}.png", png("L", size=64)) for i in range(4)])
    # Cut inside the third member's data: two members whole, then the shard ends.
    return full[: 512 * 2 + len(png("L", size=64)) * 2 + 1024 + 300]


def rows_by_uri(uri, settings):
    ds = pads.dataset(
        uri.removeprefix("s3://"),
        filesystem=arrow_filesystem(uri, settings),
        format="parquet",
        partitioning="hive",
    )
    return {r["image_uri"]: r for r in ds.to_table().to_pylist()}


def test_read_shard_members_locally(tmp_path):
    shard = tmp_path / "s.tar"
    shard.write_bytes(good_shard())
    batches = list(
        read_objects({"image_uri": np.array([str(shard)], dtype=object)}, StorageSettings())
    )
    uris = [u for b in batches for u in b["image_uri"]]
    errors = {u: e for b in batches for u, e in zip(b["image_uri"], b["read_error"], strict=True)}
    names = [u.split("#", 1)[1] for u in uris]
    assert names == [
        "sample000.png",
        "sample001.png",
        "sample002.png",
        "sample003.png",
        "sample004.dcm",
        "corrupt.png",
        "../../escape.png",
        "/abs/path.jpg",
        "link.png",
    ]
    assert "link or device" in errors[f"{shard}#link.png"]
    assert not (tmp_path / "escape.png").exists() and not (tmp_path.parent / "escape.png").exists()


def test_read_uris_streams_each_shard_once_with_the_limits(tmp_path, monkeypatch):
    """explain's read: the members asked for, in order, one pass over their shard, the
    same byte limit as scoring; a missing member or object is an error value."""
    shard, loose, cut = tmp_path / "s.tar", tmp_path / "a.png", tmp_path / "cut.tar"
    shard.write_bytes(good_shard())
    loose.write_bytes(png("L", size=300))
    cut.write_bytes(truncated_shard())
    opened = []
    real = shards.read_shard
    monkeypatch.setattr(reading, "read_shard", lambda uri, *a: opened.append(uri) or real(uri, *a))
    asked = [
        f"{shard}#sample003.png",
        str(loose),
        f"{shard}#sample000.png",
        f"{shard}#nothing.png",
        f"{cut}#t3.png",
        str(tmp_path / "gone.png"),
    ]
    got = reading.read_uris(asked, StorageSettings(), max_bytes=len(png("L", size=300)) - 1)
    assert opened == [str(shard), str(cut)]  # once each, whatever the number of members
    assert got[0] == (png("L", size=43), "") and got[2] == (png("L", size=40), "")
    assert got[1][0] == b"" and "--max-object-bytes" in got[1][1]
    assert got[3] == (b"", f"no such member in tar shard {shard}")
    assert got[4][0] == b"" and "truncated tar shard" in got[4][1]
    assert got[5] == (b"", "object not found")


def test_a_shard_without_images_is_still_a_row(tmp_path):
    shard = tmp_path / "labels-only.tar"
    shard.write_bytes(make_tar([("a.json", b"{}"), ("a.cls", b"0")]))
    (batch,) = read_objects({"image_uri": np.array([str(shard)], dtype=object)}, StorageSettings())
    assert batch["image_uri"].tolist() == [str(shard)]
    assert batch["read_error"].tolist() == ["tar shard holds no image members"]


def test_read_objects_chunks_large_shards(tmp_path):
    shard = tmp_path / "big.tar"
    shard.write_bytes(make_tar([(f"{i:04d}.png", png("L", size=16)) for i in range(150)]))
    batches = list(
        read_objects({"image_uri": np.array([str(shard)], dtype=object)}, StorageSettings())
    )
    assert [len(b["image_uri"]) for b in batches] == [64, 64, 22]


def test_tar_shards_from_s3(ray_session, bucket, settings, random_checkpoint):
    fs = filesystem(bucket, settings)
    root = bucket.removeprefix("s3://")
    fs.pipe_file(f"{root}/shards/shard-000.tar", good_shard())
    fs.pipe_file(f"{root}/shards/shard-001.tar", truncated_shard())
    fs.pipe_file(f"{root}/shards/loose.png", png("L"))
    fs.pipe_file(f"{root}/shards/not-a-tar.tar", b"this is not a tar file at all" * 40)

    summary = score(
        ScoreConfig(
            input=f"{bucket}/shards",
            model=random_checkpoint[0],
            out=f"{bucket}/out",
            modalities="CR",
            storage=settings,
        )
    )
    rows = rows_by_uri(f"{bucket}/out", settings)
    s0, s1 = f"{bucket}/shards/shard-000.tar", f"{bucket}/shards/shard-001.tar"
    ok = {u for u, r in rows.items() if r["status"] == "ok"}
    assert ok == {f"{s0}#sample{i:03d}.png" for i in range(4)} | {
        f"{s0}#sample004.dcm",
        f"{s0}#../../escape.png",
        f"{s0}#/abs/path.jpg",
        f"{s1}#t0.png",
        f"{s1}#t1.png",
        f"{bucket}/shards/loose.png",
    }
    assert rows[f"{s0}#sample004.dcm"]["modality"] == "CR"
    assert "cannot decode PNG" in rows[f"{s0}#corrupt.png"]["error"]
    assert "link or device" in rows[f"{s0}#link.png"]["error"]
    truncated = [r for u, r in rows.items() if u.startswith(s1) and r["status"] == "error"]
    assert len(truncated) == 1 and s1 in truncated[0]["error"]
    assert "truncated" in truncated[0]["error"]
    bad = rows[f"{bucket}/shards/not-a-tar.tar"]
    assert bad["status"] == "error" and "tar shard" in bad["error"]
    assert summary.rows_written == len(rows) == 9 + 3 + 1 + 1


def test_manifest_lists_only_what_it_names(ray_session, bucket, settings, random_checkpoint):
    fs = filesystem(bucket, settings)
    root = bucket.removeprefix("s3://")
    for i in range(5):
        fs.pipe_file(f"{root}/pacs/{i}.png", png("L", size=40 + i))
    listed = [f"{bucket}/pacs/{i}.png" for i in (0, 2, 4)] + [
        f"{bucket}/pacs/missing-1.png",
        f"{bucket}/gone/missing-2.dcm",
    ]
    labels = ["opacity", "normal", "", "normal", "opacity"]
    lines = ["uri,label,study_id"] + [
        f"{u},{lbl},S{i}" for i, (u, lbl) in enumerate(zip(listed, labels, strict=True))
    ]
    fs.pipe_file(f"{root}/manifests/night.csv", ("\n".join(lines) + "\n").encode())

    assert list_inputs(f"{bucket}/manifests/night.csv", settings) == listed
    summary = score(
        ScoreConfig(
            input=f"{bucket}/manifests/night.csv",
            model=random_checkpoint[0],
            out=f"{bucket}/out",
            storage=settings,
        )
    )
    rows = rows_by_uri(f"{bucket}/out", settings)
    assert set(rows) == set(listed) and summary.rows_written == 5
    assert {u for u, r in rows.items() if r["status"] == "error"} == set(listed[3:])
    assert all(rows[u]["error"] == "object not found" for u in listed[3:])
    # Labels flow into evaluation and training.
    assert manifest_labels(f"{bucket}/manifests/night.csv", settings) == {
        listed[0]: "opacity",
        listed[1]: "normal",
        listed[3]: "normal",
        listed[4]: "opacity",
    }


def test_parquet_manifest_and_training_labels(bucket, settings):
    fs = filesystem(bucket, settings)
    root = bucket.removeprefix("s3://")
    table = pa.table(
        {"uri": [f"{bucket}/a.png", f"{bucket}/b.png"], "label": ["normal", "opacity"]}
    )
    buf = io.BytesIO()
    pq.write_table(table, buf)
    fs.pipe_file(f"{root}/m.parquet", buf.getvalue())
    assert labelled_inputs(f"{bucket}/m.parquet", settings) == [
        (f"{bucket}/a.png", "normal"),
        (f"{bucket}/b.png", "opacity"),
    ]


def test_bad_manifests_are_clear(tmp_path):
    (tmp_path / "no-uri.csv").write_text("path,label\nx,y\n")
    with pytest.raises(MeddxError, match="needs a 'uri' column"):
        list_inputs(str(tmp_path / "no-uri.csv"), StorageSettings())
    with pytest.raises(MeddxError, match="manifest not found"):
        list_inputs(str(tmp_path / "absent.csv"), StorageSettings())


def test_a_manifest_is_streamed_whatever_its_size(tmp_path, bucket, settings):
    """A manifest names the inputs, it is not one: read batch by batch, never whole, so
    --max-object-bytes does not apply to it (an S3 Inventory listing runs to GBs)."""
    body = "uri\n" + "".join(f"/data/{i:06d}.png\n" for i in range(100_000))
    (tmp_path / "big.csv").write_text(body)
    filesystem(bucket, settings).pipe_file(f"{bucket[5:]}/big.csv", body.encode())
    for uri, where in (
        (str(tmp_path / "big.csv"), StorageSettings()),
        (f"{bucket}/big.csv", settings),
    ):
        source, located = listing.list_located(uri, where)
        assert located is None
        reader = source.batches()
        sizes = [batch.num_rows for batch in reader]
        assert sum(sizes) == 100_000 and max(sizes) <= listing.BATCH_ROWS < 100_000
        table = source.table()
        assert table["image_uri"][99_999].as_py() == "/data/099999.png"


def test_an_s3_inventory_listing_is_a_manifest(tmp_path):
    """The columns S3 Inventory writes in Parquet: bucket and key make the URI, and
    size, last_modified_date and e_tag are the listing's facts."""
    when = dt.datetime(2026, 12, 1, 3, tzinfo=dt.UTC)
    keys = ["cxr/a.dcm", "cxr/b.dcm", "cxr/a.dcm", "cxr/_meta/x.dcm", "cxr/", "cxr/old.dcm"]
    keys += ["cxr/gone.dcm"]
    n = len(keys)
    inventory = pa.table(
        {
            "bucket": ["archive"] * n,
            "key": keys,
            "size": pa.array([10, 20, 10, 1, 0, 5, 6], pa.int64()),
            "last_modified_date": pa.array([when] * n, pa.timestamp("ms", tz="UTC")),
            "e_tag": ["e1", "e2", "e1", "m", "f", "o", "g"],
            "storage_class": ["STANDARD"] * n,
            # A versioned inventory: an earlier version, and a deleted object.
            "is_latest": [True] * 5 + [False, True],
            "is_delete_marker": [False] * 6 + [True],
        }
    )
    pq.write_table(inventory, tmp_path / "inventory.parquet")
    table = listing.list_table(str(tmp_path / "inventory.parquet"), StorageSettings())
    assert table.schema == listing.LISTING_SCHEMA
    assert table.to_pylist() == [
        {"image_uri": "s3://archive/cxr/a.dcm", "size": 10, "mtime": when, "etag": "e1"},
        {"image_uri": "s3://archive/cxr/b.dcm", "size": 20, "mtime": when, "etag": "e2"},
    ]
    # A manifest whose mtime is seconds since the epoch, as many exports write it; one
    # whose mtime cannot be a time is refused in one line.
    (tmp_path / "epoch.csv").write_text("uri,mtime\n/a.png,1764547200.5\n")
    (epoch,) = listing.list_table(str(tmp_path / "epoch.csv"), StorageSettings()).to_pylist()
    assert epoch["mtime"] == dt.datetime(2025, 12, 1, 0, 0, 0, 500000, tzinfo=dt.UTC)
    pq.write_table(pa.table({"uri": ["/a.png"], "mtime": [True]}), tmp_path / "bad.parquet")
    with pytest.raises(MeddxError, match=r"^cannot read manifest .*bad\.parquet: "):
        listing.list_table(str(tmp_path / "bad.parquet"), StorageSettings())
    pq.write_table(inventory.drop_columns(["key"]), tmp_path / "neither.parquet")
    with pytest.raises(MeddxError, match="needs a 'uri' column"):
        listing.list_table(str(tmp_path / "neither.parquet"), StorageSettings())


def test_s3_reads_one_request_each_with_the_byte_limit(bucket, settings, monkeypatch):
    """Ranged GETs, several in flight: the limit, empty objects and order hold on S3.
    A first read of 64 bytes: objects up to it take one GET, longer ones are sized,
    then read on (up to the limit) or refused."""
    from meddx.inputs import storage

    monkeypatch.setattr(storage, "FIRST_READ_BYTES", 64)
    fs = filesystem("s3://", settings)
    bodies = {f"{i:02d}.png": bytes([i]) * (i * 10) for i in range(20)}  # 00.png is empty
    fs.pipe({f"{bucket[5:]}/o/{name}": data for name, data in bodies.items()})
    uris = [f"{bucket}/o/{name}" for name in bodies] + [f"{bucket}/o/missing.png"]
    (batch,) = read_objects({"image_uri": np.array(uris, dtype=object)}, settings, max_bytes=150)
    assert batch["image_uri"].tolist() == uris
    for uri, data, error in zip(
        uris[:-1], batch["bytes"][:-1], batch["read_error"][:-1], strict=True
    ):
        expected = bodies[uri.rsplit("/", 1)[1]]
        if len(expected) > 150:
            limit = "over the limit of 150 (--max-object-bytes)"
            assert error == f"object of {len(expected):,} bytes is {limit}"
            assert data == b""
        else:
            assert (data, error) == (expected, "")
    assert batch["read_error"][-1] == "object not found"


def test_reads_are_bounded_by_bytes_not_only_by_count(tmp_path, monkeypatch):
    """Detector films of tens of MB: the objects in flight and the rows of a read batch
    stay under their byte budgets, and still one row per object, in order."""
    assert reading.reads_in_flight(0, 0) == 1  # nothing read yet: sizes unknown
    assert reading.reads_in_flight(8 * 500_000, 8) == reading.READ_CONCURRENCY  # PNGs
    assert reading.reads_in_flight(4 * 30 * 2**20, 4) == 4  # 30 MiB DICOMs: 128 MiB
    assert reading.reads_in_flight(2 * 400 * 2**20, 2) == 1  # never none

    monkeypatch.setattr(reading, "READ_CHUNK_BYTES", 3 * 2**20)
    uris = []
    for i in range(7):
        path = tmp_path / f"film-{i}.dcm"
        path.write_bytes(bytes([i]) * 2**20)  # 1 MiB each
        uris.append(str(path))
    batch = {"image_uri": np.array(uris, dtype=object)}
    chunks = list(reading.read_objects(batch, StorageSettings()))
    assert [len(c["image_uri"]) for c in chunks] == [3, 3, 1]
    assert [u for c in chunks for u in c["image_uri"]] == uris
    assert all(sum(len(b) for b in c["bytes"]) <= 3 * 2**20 for c in chunks)


def test_reading_with_decode_matches_two_stages_and_drops_known(tmp_path):
    """One task reads, drops what was scored already and decodes: the same rows as the
    two stages apart, without any bytes column leaving it."""
    from meddx.imaging.decode import DecodeSettings, decode_images

    uris = []
    for i, data in enumerate([png("L", size=48), dicom_cr(), b"not an image", png("RGB")]):
        path = tmp_path / f"in-{i}.bin"
        path.write_bytes(data)
        uris.append(str(path))
    uris.append(str(tmp_path / "missing.png"))
    batch = {"image_uri": np.array(uris, dtype=object)}
    settings = DecodeSettings(size=32)
    (apart,) = [decode_images(c, settings) for c in read_objects(batch, StorageSettings())]
    (one,) = list(read_objects(batch, StorageSettings(), decode=settings))
    assert "bytes" not in one and "read_error" not in one
    assert one.keys() == apart.keys()
    for key in one:
        np.testing.assert_array_equal(one[key], apart[key])
    assert list(one["status"]) == ["ok", "ok", "error", "ok", "error"]

    known = np.empty(len(uris), dtype=object)  # null: an input not scored before
    known[0] = [f"{uris[0]}{KNOWN_SEPARATOR}{apart['content_sha256'][0]}"]
    known[1] = [f"{uris[1]}{KNOWN_SEPARATOR}a different sha"]
    batch = {**batch, "known": known}
    (kept,) = list(read_objects(batch, StorageSettings(), decode=settings))
    assert list(kept["image_uri"]) == uris[1:]
    np.testing.assert_array_equal(kept["image"], apart["image"][1:])
