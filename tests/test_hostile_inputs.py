"""Hostile images and archives: small on disk, huge when decoded or unpacked.

Each must be one error row with a clear reason (a shard refused half way: a row for the
shard too), never a crash, never a shorter output; memory stays bounded; nothing is
written to the file system. The bombs run in a subprocess under a 1 GiB address-space
limit: each would need several GiB if a limit failed (and could not take the machine down
with it).
"""

from __future__ import annotations

import gzip
import json
import logging
import lzma
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pydicom

from meddx.cli import main
from meddx.imaging.decode import DecodeSettings, decode_image, decode_images
from meddx.inputs.reading import read_objects
from meddx.inputs.storage import StorageSettings

from . import hostile
from .images import dicom_cr, make_tar, png, png_bomb

# The read and decode stages exactly as a Ray worker runs them, in a process whose
# address space is capped, with the member limit of a shard given on the command line.
HARNESS = r"""
import json, resource, sys
cap = int(sys.argv[3]) * 2**20
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
import numpy as np
from meddx.inputs import reading, shards
from meddx.imaging.decode import DecodeSettings, decode_images
from meddx.inputs.storage import StorageSettings
shards.MAX_SHARD_MEMBERS = int(sys.argv[2])
rows = []
batch = {"image_uri": np.array(json.loads(sys.argv[1]), dtype=object)}
for chunk in reading.read_objects(batch, StorageSettings()):
    out = decode_images(chunk, DecodeSettings(size=32))
    rows += zip(out["image_uri"].tolist(), out["status"].tolist(), out["error"].tolist())
# This process's own high-water mark (ru_maxrss would count the parent's, from before exec).
status = open("/proc/self/status").read().split("VmHWM:")[1]
print(json.dumps({"rows": rows, "peak_mib": int(status.split()[0]) / 1024}))
"""
ADDRESS_SPACE_MIB = 1024


def run_capped(uris: list[str], cwd: Path, max_members: int) -> tuple[dict, float]:
    result = subprocess.run(
        [sys.executable, "-c", HARNESS, json.dumps(uris), str(max_members), str(ADDRESS_SPACE_MIB)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.splitlines()[-1])
    rows = [tuple(r) for r in out["rows"]]
    assert len({uri for uri, _, _ in rows}) == len(rows), "one row per image, no duplicates"
    return {uri: (status, error) for uri, status, error in rows}, out["peak_mib"]


def test_bombs_are_error_rows_in_bounded_memory(tmp_path):
    inputs, work = tmp_path / "in", tmp_path / "work"
    inputs.mkdir()
    work.mkdir()
    files = {
        "png-bomb.png": png_bomb(),  # 100,000 x 100,000 declared
        "jpeg-bomb.jpg": hostile.jpeg_bomb(),  # 65,000 x 65,000 declared
        "rows.dcm": hostile.dicom_huge_rows(),
        "jpeg-frame.dcm": hostile.dicom_jpeg_frame_bomb(),
        "deflated.dcm": hostile.deflated_dicom_bomb(),  # 1 MB, inflates to 1 GiB
        # ... its transfer syntax UID pushed past the first 8 KB by a padded element
        "deflated-padded.dcm": hostile.deflated_dicom_bomb(padding=8192),
        # a JP2-boxed frame, its codestream past the first 8 KB, declaring 65,000 squared
        "boxed-jp2.dcm": hostile.boxed_jp2_dicom_bomb(),
        "bomb.tar.gz": hostile.gzip_tar_bomb(),  # 2 MB, one member of 2 GiB
        "pax.tar.gz": hostile.pax_header_bomb(),  # a 1 GiB pax header
        # ... after a member whose pax GNU.sparse.size says 10**12
        "sparse.tar.gz": hostile.sparse_pax_header_bomb(),
        "links.tar": hostile.links_tar(),
        "many.tar": hostile.members_tar(60),
    }
    for name, data in files.items():
        (inputs / name).write_bytes(data)
    with open(inputs / "huge.png", "wb") as fh:  # sparse: 10 GiB, no disk used
        fh.truncate(10 * 2**30)
    assert sum(p.stat().st_blocks * 512 for p in inputs.iterdir()) < 20 * 2**20

    uris = sorted(str(p) for p in inputs.iterdir())
    rows, peak_mib = run_capped(uris, work, max_members=50)

    def error(name):
        status, reason = rows[str(inputs / name)]
        assert status == "error", (name, reason)
        return reason

    assert "decompression bomb" in error("png-bomb.png")
    assert "decompression bomb" in error("jpeg-bomb.jpg")
    assert error("rows.dcm") == (
        "65535x65535 pixels exceeds the limit of 60,000,000 (possible decompression bomb)"
    )
    assert error("jpeg-frame.dcm").startswith("compressed frame declares 65000x65000 pixels")
    assert error("deflated.dcm").startswith("deflated DICOM inflates past 536,870,912 bytes")
    assert error("deflated-padded.dcm") == error("deflated.dcm")
    assert error("boxed-jp2.dcm").startswith("compressed frame declares 65000x65000 pixels")
    assert error("huge.png") == (
        "object of 10,737,418,240 bytes is over the limit of 536,870,912 (--max-object-bytes)"
    )
    assert error("bomb.tar.gz#bomb.png").startswith("tar member of 2,147,483,648 bytes is over")
    assert error("bomb.tar.gz").startswith(
        "compressed tar shard inflates past 536,870,912 bytes (possible decompression bomb)"
    )
    assert error("pax.tar.gz").startswith("tar header data over 1,048,576 bytes")
    assert error("sparse.tar.gz#a.png").startswith("tar member of 1,000,000,000,000 bytes")
    assert error("sparse.tar.gz").startswith("tar header data over 1,048,576 bytes")
    for name in ("ok.png", "../../escape.png", "/abs/evil.png"):
        assert rows[f"{inputs}/links.tar#{name}"] == ("ok", "")
    for name in ("sym.png", "hard.png", "dev.png", "fifo.png"):
        assert "link or device" in error(f"links.tar#{name}")
    many = [u for u in rows if u.startswith(f"{inputs}/many.tar#")]
    assert len(many) == 50 and all(rows[u][1] == "empty object (0 bytes)" for u in many)
    assert error("many.tar").startswith("tar shard holds over 50 members")
    assert len(rows) == 8 + 2 + 1 + 2 + 7 + 51

    # Memory stayed bounded, and nothing was extracted anywhere.
    assert peak_mib < 512, peak_mib
    assert list(work.iterdir()) == []
    assert not (tmp_path / "escape.png").exists() and not Path("/abs/evil.png").exists()
    assert sorted(p.name for p in inputs.iterdir()) == sorted([*files, "huge.png"])


def test_object_limit_refuses_unread_and_compressed_shards_still_read(tmp_path):
    small, big = png("L", size=40), png("L", size=400)
    (tmp_path / "big.png").write_bytes(big)
    (tmp_path / "s.tar").write_bytes(make_tar([("small.png", small), ("big.png", big)]))
    tar_bytes = make_tar([("a.png", small), ("b.png", png("L", size=50))])
    (tmp_path / "s.tar.gz").write_bytes(gzip.compress(tar_bytes))
    (tmp_path / "xz.tar").write_bytes(lzma.compress(tar_bytes))
    uris = [str(tmp_path / n) for n in ("big.png", "s.tar", "s.tar.gz", "xz.tar")]
    (batch,) = read_objects(
        {"image_uri": np.array(uris, dtype=object)}, StorageSettings(), max_bytes=len(big) - 1
    )
    got = dict(zip(batch["image_uri"], batch["read_error"], strict=True))
    limit = f"over the limit of {len(big) - 1:,} (--max-object-bytes)"
    assert got == {
        uris[0]: f"object of {len(big):,} bytes is {limit}",
        f"{uris[1]}#small.png": "",
        f"{uris[1]}#big.png": f"tar member of {len(big):,} bytes is {limit}",
        f"{uris[2]}#a.png": "",
        f"{uris[2]}#b.png": "",
        f"{uris[3]}#a.png": "",
        f"{uris[3]}#b.png": "",
    }


def test_a_real_deflated_dicom_still_decodes():
    data = Path(pydicom.data.get_testdata_file("image_dfl.dcm")).read_bytes()
    pixels, info = decode_image(data, DecodeSettings(size=32, modalities=None))
    assert info["transfer_syntax"] == "1.2.840.10008.1.2.1.99" and pixels.max() > 0


def malformed_batch() -> tuple[dict, dict[str, str]]:
    cases = hostile.malformed_dicoms()
    batch = {
        "image_uri": np.array([f"{name}.dcm" for name in cases], dtype=object),
        "bytes": np.array([data for data, _ in cases.values()], dtype=object),
        "read_error": np.array([""] * len(cases), dtype=object),
    }
    return batch, {f"{name}.dcm": reason for name, (_, reason) in cases.items()}


def test_each_malformed_attribute_is_an_error_row_naming_it(caplog, capfd):
    batch, reasons = malformed_batch()
    # One good film in the same batch is still scored.
    extra = {"image_uri": "good.dcm", "bytes": dicom_cr(), "read_error": ""}
    batch = {k: np.array([*v, extra[k]], dtype=object) for k, v in batch.items()}
    caplog.clear()  # making the files logged their values: only decoding's count
    capfd.readouterr()
    with caplog.at_level(logging.DEBUG):
        out = decode_images(batch, DecodeSettings(size=32, pseudonym_key=b"site-key"))
    rows = dict(zip(out["image_uri"], zip(out["status"], out["error"], strict=True), strict=True))
    assert rows.pop("good.dcm") == ("ok", "")
    assert len(rows) == len(reasons) == 21
    for name, reason in reasons.items():
        status, error = rows[name]
        assert status == "error" and reason in error, (name, error)
        assert error.startswith(reason.split()[0]), (name, error)  # the attribute comes first
    # No value from the files in a reason, a log record or anything printed.
    printed = capfd.readouterr()
    for text in (*out["error"], caplog.text, printed.out, printed.err):
        assert hostile.PROBE not in text and "HYPERLINK" not in text


def test_any_other_failure_is_its_exception_type_and_no_value(monkeypatch):
    from meddx.imaging import decode, dicom

    def broken(*args, **kwargs):
        raise KeyError(f"({hostile.PROBE})")

    monkeypatch.setattr(dicom, "to_unit_gray", broken)
    batch = {
        "image_uri": np.array(["a.dcm", "b.png"], dtype=object),
        "bytes": np.array([dicom_cr(patient_name=hostile.PROBE), png("L", size=40)], dtype=object),
        "read_error": np.array(["", ""], dtype=object),
    }
    out = decode_images(batch, DecodeSettings(size=32))
    assert out["status"].tolist() == ["error", "ok"]
    assert out["error"].tolist() == ["cannot decode DICOM (KeyError)", ""]
    monkeypatch.setattr(decode, "qc_of", lambda *a: 1 / 0)  # a failure past decoding
    out = decode_images(batch, DecodeSettings(size=32))
    assert out["error"].tolist()[1] == "decoding failed (ZeroDivisionError)"
    assert out["status"].tolist() == ["error", "error"] and out["qc"].tolist() == ["", ""]


def test_limits_flow_from_the_cli_to_the_workers(
    ray_session, tmp_path, random_checkpoint, capsys, monkeypatch
):
    # The site's key makes the UIDs read (and checked) too.
    monkeypatch.setenv("MEDDX_PSEUDONYM_KEY", "hostile-inputs-key")
    inputs = tmp_path / "in"
    inputs.mkdir()
    malformed, reasons = malformed_batch()
    for name, data in zip(malformed["image_uri"], malformed["bytes"], strict=True):
        (inputs / name).write_bytes(data)
    (inputs / "ok.png").write_bytes(png("L", size=48))
    (inputs / "big.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(3_000_000))
    (inputs / "shard.tar").write_bytes(
        make_tar([("small.png", png("L", size=40)), ("big.png", bytes(2_500_000))])
    )
    (inputs / "bomb.tar.gz").write_bytes(hostile.gzip_tar_bomb(mib=64))
    (inputs / "links.tar").write_bytes(hostile.links_tar())
    (inputs / "png-bomb.png").write_bytes(png_bomb())
    out = tmp_path / "out"

    limits = ["--run-date", "2026-05-06", "--max-object-bytes", "2000000"]
    main(["score", str(inputs), "--model", random_checkpoint[0], "--out", str(out), *limits])
    printed = capsys.readouterr()
    assert "inputs=27 ok=5 errors=30 rows_written=35" in printed.out
    table = pads.dataset(str(out), format="parquet", partitioning="hive").to_table()
    rows = {r["image_uri"]: r["error"] for r in table.to_pylist()}
    assert len(rows) == table.num_rows == 35
    # Malformed attributes: one error row each, naming the attribute, no value from a file.
    for name, reason in reasons.items():
        assert reason in rows[f"{inputs}/{name}"], (name, rows[f"{inputs}/{name}"])
    for text in (printed.out, printed.err, *filter(None, rows.values())):
        assert hostile.PROBE not in text and "HYPERLINK" not in text
    assert rows[f"{inputs}/big.png"] == (
        "object of 3,000,008 bytes is over the limit of 2,000,000 (--max-object-bytes)"
    )
    assert rows[f"{inputs}/shard.tar#big.png"].startswith("tar member of 2,500,000 bytes")
    assert rows[f"{inputs}/bomb.tar.gz#bomb.png"].startswith("tar member of 67,108,864 bytes")
    assert "inflates past" in rows[f"{inputs}/bomb.tar.gz"]
    assert "decompression bomb" in rows[f"{inputs}/png-bomb.png"]
    assert rows[f"{inputs}/ok.png"] is None and rows[f"{inputs}/shard.tar#small.png"] is None
