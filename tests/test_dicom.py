"""DICOM done right: pydicom's own test files, windowing, MONOCHROME1, no identifiers out."""

import collections
import hashlib
import hmac
import io
import re
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pydicom
import pytest
from PIL import Image
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from meddx.imaging import dicom
from meddx.imaging.decode import DecodeError, DecodeSettings, Skipped, decode_image, sniff
from meddx.imaging.rules import DEFAULT as DEFAULT_RULES
from meddx.pipelines.scoring import ScoreConfig, score

from .images import dicom_cr, gradient
from .leaks import leaks_in_tree, ray_session_dir

CORPUS = Path(pydicom.__file__).parent / "data" / "test_files"
ANY = DecodeSettings(size=64, modalities=None)


def corpus_files():
    return sorted(p for p in CORPUS.rglob("*") if p.is_file())


def cr_files():
    found = []
    for path in corpus_files():
        try:
            ds = pydicom.dcmread(path, force=True)
        except Exception:
            continue
        if ds.get("Modality") == "CR" and "PixelData" in ds:
            found.append(path)
    return found


def test_detected_by_bytes_with_and_without_preamble():
    assert sniff(dicom_cr()) == "dicom"
    assert sniff(dicom_cr(preamble=False)) == "dicom"
    pixels, info = decode_image(dicom_cr(preamble=False), DecodeSettings(size=32))
    assert pixels.shape == (32, 32) and info["modality"] == "CR"


def test_window_and_monochrome1_on_real_cr_files():
    files = cr_files()
    assert files, "pydicom's test data should hold CR images"
    for path in files:
        ds = pydicom.dcmread(path)
        assert ds.PhotometricInterpretation == "MONOCHROME1"
        ours = dicom.to_unit_gray(ds, max_pixels=10**8, modalities=None)
        shown = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds).astype(float)
        # pydicom's VOI output, scaled to [0, 1] over its range, then inverted: bone bright.
        lo, hi = shown.min(), shown.max()
        reference = 1 - (shown - lo) / (hi - lo)
        assert np.corrcoef(ours.ravel(), reference.ravel())[0, 1] > 0.999
        # Independently, by DICOM's linear window formula (PS3.3 C.11.2.1.2).
        c, w = (
            float(ds.WindowCenter if not isinstance(ds.WindowCenter, list) else ds.WindowCenter[0]),
            float(ds.WindowWidth if not isinstance(ds.WindowWidth, list) else ds.WindowWidth[0]),
        )
        x = apply_modality_lut(ds.pixel_array, ds).astype(float)
        expected = 1 - np.clip((x - (c - 0.5)) / (w - 1) + 0.5, 0, 1)
        np.testing.assert_allclose(ours, expected, atol=2e-3)


def test_monochrome1_is_the_inverse_of_monochrome2():
    a = dicom.to_unit_gray(
        pydicom.dcmread(io.BytesIO(dicom_cr())), max_pixels=10**6, modalities=None
    )
    b = dicom.to_unit_gray(
        pydicom.dcmread(io.BytesIO(dicom_cr(photometric="MONOCHROME1"))),
        max_pixels=10**6,
        modalities=None,
    )
    np.testing.assert_allclose(a + b, 1.0, atol=1e-6)


def test_voi_lut_sequence_wins_over_window():
    from pydicom.dataset import Dataset

    ds = pydicom.dcmread(io.BytesIO(dicom_cr(window=(100.0, 10.0))))
    lut = Dataset()
    # 4096 entries, first mapped value 0, 16-bit output: a gamma curve.
    lut.LUTDescriptor = [4096, 0, 16]
    lut.LUTData = (65535 * (np.arange(4096) / 4095) ** 0.5).astype(np.uint16).tolist()
    ds.VOILUTSequence = [lut]
    ours = dicom.to_unit_gray(ds, max_pixels=10**6, modalities=None)
    expected = apply_voi_lut(ds.pixel_array, ds, prefer_lut=True) / 65535.0
    assert ours.max() > 0.99  # the LUT, not the narrow window, decided
    np.testing.assert_allclose(ours, expected, atol=1e-6)


def test_no_window_uses_full_range():
    pixels = (gradient(32) * 1000 + 500).astype(np.uint16)
    ds = pydicom.dcmread(io.BytesIO(dicom_cr(pixels, window=None)))
    ours = dicom.to_unit_gray(ds, max_pixels=10**6, modalities=None)
    assert ours.min() == 0.0 and ours.max() == 1.0


def no_pixel_data() -> bytes:
    ds = pydicom.dcmread(io.BytesIO(dicom_cr(gradient(16))))
    del ds.PixelData
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.mark.parametrize(
    "data, reason",
    [
        (no_pixel_data, "no pixel data"),
        (lambda: dicom_cr(np.zeros((4000, 4000), np.uint16)), "exceeds the limit"),
    ],
)
def test_unscorable_dicom_is_a_reason(data, reason):
    with pytest.raises(DecodeError, match=re.escape(reason)):
        decode_image(data(), DecodeSettings(size=32, max_pixels=10_000_000))


@pytest.mark.parametrize(
    "data, reason",
    [
        (
            lambda: dicom_cr(modality="CT"),
            'rule "modality": Modality CT is not one this model accepts (CR, DX)',
        ),
        (lambda: (CORPUS / "rtplan.dcm").read_bytes(), 'rule "not an image" (SOPClassUID)'),
        (lambda: (CORPUS / "test-SR.dcm").read_bytes(), 'rule "not an image" (SOPClassUID)'),
    ],
)
def test_what_the_rules_select_out_is_skipped_with_the_rule(data, reason):
    with pytest.raises(Skipped, match=re.escape(reason)) as raised:
        decode_image(data(), DecodeSettings(size=32, max_pixels=10_000_000))
    # What the header said comes with it: the row keeps its attributes.
    assert raised.value.info["modality"]


def test_multiframe_scores_first_frame_and_says_so():
    # pydicom's two-frame RGB file: its second frame is its first one inverted.
    path = CORPUS / "SC_rgb_rle_2frame.dcm"
    pixels, info = decode_image(path.read_bytes(), ANY)
    assert info["frames"] == 2 and pixels.shape == (64, 64)

    def shown(frame):  # pydicom's frame as luminance (ITU-R BT.601), 8-bit, at 64 px
        gray = frame.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32) / 255
        return np.asarray(Image.fromarray(gray).resize((64, 64), Image.BILINEAR)) * 255

    first, second = (np.abs(pixels - shown(f)).mean() for f in pydicom.dcmread(path).pixel_array)
    assert first < 1 and second > 50, (first, second)
    # Three grayscale frames that differ: what is scored is the first, exactly.
    ramp = (gradient(64) * 4095).astype(np.uint16)
    frames = np.stack([ramp, 4095 - ramp, np.full_like(ramp, 1000)])
    pixels, info = decode_image(dicom_cr(frames), ANY)
    assert info["frames"] == 3 and (info["rows"], info["columns"]) == (64, 64)
    alone = [decode_image(dicom_cr(f), ANY)[0] for f in frames]
    assert not np.array_equal(alone[0], alone[1]) and not np.array_equal(alone[0], alone[2])
    np.testing.assert_array_equal(pixels, alone[0])


def test_identifiers_never_in_error_text():
    data = dicom_cr(patient_name="Secret^Person")
    ds = pydicom.dcmread(io.BytesIO(data))
    text = dicom.scrub("failed near Secret^Person with MRN-0042", ds)
    assert "Secret^Person" not in text and "MRN-0042" not in text


@pytest.mark.slow
def test_pydicom_corpus_one_row_per_file(ray_session, tmp_path, random_checkpoint, capfd):
    files = corpus_files()
    inputs = tmp_path / "corpus"
    for i, path in enumerate(files):
        target = inputs / f"{i:03d}-{path.name.lstrip('._')}"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
    summary = score(
        ScoreConfig(
            input=str(inputs),
            model=random_checkpoint[0],
            out=str(tmp_path / "out"),
            modalities="any",
            run_date="2026-01-01",
        )
    )
    table = pads.dataset(str(tmp_path / "out"), format="parquet", partitioning="hive").to_table()
    assert summary.inputs == table.num_rows == len(files)
    rows = table.to_pylist()
    assert all(r["error"] for r in rows if r["status"] == "error")
    reasons = collections.Counter(r["error"].split(":")[0][:70] for r in rows if r["error"])
    print(f"\npydicom corpus: {len(files)} files, {summary.ok} scored, {summary.errors} errors")
    for reason, count in reasons.most_common():
        print(f"  {count:3d}  {reason}")
    # Whatever pydicom itself can turn into pixels, meddx scores.
    by_name = {r["image_uri"].rsplit("/", 1)[1][4:]: r for r in rows}
    for path in files:
        try:
            ds = pydicom.dcmread(path)
            ds.pixel_array  # noqa: B018
            rows_ok = ds.Rows > 0
        except Exception:
            continue
        if not rows_ok:
            continue
        row = by_name[path.name.lstrip("._")]
        # ... unless the default rules select it out: a segmentation, a raw detector image.
        refused = DEFAULT_RULES.refused(ds)
        if refused:
            assert (row["status"], row["error"]) == ("skipped", refused), path.name
        else:
            assert row["status"] == "ok", path.name


@pytest.mark.slow
def test_patient_name_never_leaves_the_job(ray_session, tmp_path, random_checkpoint, monkeypatch):
    name = "Zyxwvut^Qponm"
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "chest.dcm").write_bytes(dicom_cr(patient_name=name))
    (inputs / "ct.dcm").write_bytes(dicom_cr(patient_name=name, modality="CT"))
    monkeypatch.setenv("MEDDX_PSEUDONYM_KEY", "site-secret")
    out = tmp_path / "out"
    score(ScoreConfig(input=str(inputs), model=random_checkpoint[0], out=str(out)))
    rows = {
        Path(r["image_uri"]).name: r
        for r in pads.dataset(str(out), format="parquet", partitioning="hive")
        .to_table()
        .to_pylist()
    }
    chest = rows["chest.dcm"]
    assert chest["status"] == "ok" and chest["modality"] == "CR"
    assert chest["view_position"] == "PA" and chest["body_part"] == "CHEST"
    expected = hmac.new(b"site-secret", b"1.2.826.0.1.3680043.8.498.1", hashlib.sha256)
    assert chest["study_pseudonym"] == expected.hexdigest()[:32]
    assert rows["ct.dcm"]["status"] == "skipped" and "Modality CT" in rows["ct.dcm"]["error"]
    # Nothing the run wrote, nor Ray's logs of this session, holds the name, the MRN or a UID.
    secrets = {
        "patient name": name.encode(),
        "patient id": b"MRN-0042",
        "study UID": b"1.2.826.0.1.3680043.8.498.1",
        "pseudonym key": b"site-secret",
    }
    assert leaks_in_tree(out, secrets) + leaks_in_tree(ray_session_dir() / "logs", secrets) == []
