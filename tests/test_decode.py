import hashlib

import numpy as np
import pytest

from meddx.imaging.decode import DecodeError, DecodeSettings, decode_image, decode_images, sniff
from meddx.inputs.reading import read_objects
from meddx.inputs.storage import StorageSettings

from .images import broken_inputs, jpeg, png

SETTINGS = DecodeSettings(size=32)


@pytest.mark.parametrize("mode", ["L", "I;16", "RGB", "RGBA"])
def test_png_modes_decode_to_gray_uint8(mode):
    out = decode_image(png(mode), SETTINGS)[0]
    assert out.shape == (32, 32) and out.dtype == np.uint8
    # The test image is a diagonal gradient: dark top-left, bright bottom-right.
    assert out[0, 0] < 20 and out[-1, -1] > 200


def test_16_bit_is_windowed_to_its_stored_range():
    # 12-bit values in a 16-bit PNG must not come out nearly black.
    assert decode_image(png("I;16"), SETTINGS)[0].max() > 240


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_jpeg_decodes(mode):
    out = decode_image(jpeg(mode=mode), SETTINGS)[0]
    assert out.shape == (32, 32) and out[-1, -1] > 200


def test_format_comes_from_bytes_not_name():
    assert sniff(png()) == "png"
    assert sniff(jpeg()) == "jpeg"
    assert sniff(b"\0" * 128 + b"DICM" + b"\0" * 8) == "dicom"
    assert sniff(b"GIF89a") is None


@pytest.mark.parametrize(
    "name, reason",
    [
        ("truncated.png", "cannot decode PNG"),
        ("empty.png", "empty object"),
        ("notes.png", "not a PNG, JPEG or DICOM"),
        ("random.jpg", "not a PNG, JPEG or DICOM"),
        ("half.jpg", "cannot decode JPEG"),
        ("bomb.png", "decompression bomb"),
    ],
)
def test_broken_inputs_raise_one_line_reasons(name, reason):
    with pytest.raises(DecodeError) as info:
        decode_image(broken_inputs()[name], SETTINGS)
    assert reason in str(info.value)
    assert "\n" not in str(info.value)


def test_pixel_limit_is_configurable():
    with pytest.raises(DecodeError, match="exceeds the limit of 1,000"):
        decode_image(png(size=80), DecodeSettings(size=32, max_pixels=1000))


def test_batch_stages_turn_failures_into_values(tmp_path):
    (tmp_path / "good.png").write_bytes(png())
    (tmp_path / "bad.png").write_bytes(b"nope")
    uris = [str(tmp_path / "good.png"), str(tmp_path / "bad.png"), str(tmp_path / "missing.png")]
    (batch,) = read_objects({"image_uri": np.array(uris, dtype=object)}, StorageSettings())
    out = decode_images(batch, SETTINGS)
    assert out["status"].tolist() == ["ok", "error", "error"]
    assert out["error"][0] == ""
    assert "not a PNG" in out["error"][1]
    assert out["error"][2] == "object not found"
    assert out["content_sha256"][0] == hashlib.sha256(png()).hexdigest()
    assert out["content_sha256"][1] == hashlib.sha256(b"nope").hexdigest()
    assert out["content_sha256"][2] == ""
    assert out["image"].shape == (3, 32, 32)
    assert out["image"][0].max() > 200 and out["image"][1].max() == 0
    assert "bytes" not in out


def test_pixel_figures_match_numpy():
    """The quality check's figures from one histogram equal numpy's std, percentiles
    (linear interpolation) and clipped share, on uniform, narrow and tiny images."""
    from meddx.imaging.decode import pixel_figures

    rng = np.random.default_rng(0)
    images = [
        rng.integers(0, 256, (224, 224)),
        rng.integers(100, 103, (597, 512)),
        np.clip(rng.normal(128, 60, (5, 7)), 0, 255),
        np.full((1, 1), 7),
    ]
    for image in (i.astype(np.uint8) for i in images):
        lo, hi = np.percentile(image, (1, 99))
        clipped = np.count_nonzero((image <= 2) | (image >= 253)) / image.size
        figures = pixel_figures(image)
        expected = [image.std(), lo, hi, clipped]
        got = [figures[k] for k in ("pixel_std", "pixel_p01", "pixel_p99", "pixel_clipped")]
        assert np.allclose(got, expected, atol=1e-9), (got, expected)
