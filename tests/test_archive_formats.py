"""Films as archives hold them: every synth format, and decoding only what the model needs.

Detector-size films appear only in the few cases that need one per format.
"""

import io

import numpy as np
import pydicom
import pytest
from PIL import Image

from meddx.config import SynthConfig
from meddx.imaging import decode, dicom, pixel_data
from meddx.names import SYNTH_FORMATS
from meddx.synthetic.chest import MIX, encode_png16, film_format, render_film, write_archive
from meddx.synthetic.dicom_film import encode_film

DICOM_FORMATS = [f for f in SYNTH_FORMATS if f.startswith("dicom")]
# Formats whose codec decodes a lower resolution itself (the rest are box-reduced).
CODEC_REDUCED = {"jpeg", "dicom-jpeg", "dicom-j2k", "dicom-j2k-lossy", "dicom-htj2k"}
SYNTAX = {
    "dicom": pydicom.uid.ExplicitVRLittleEndian,
    "dicom-j2k": pydicom.uid.JPEG2000Lossless,
    "dicom-j2k-lossy": pydicom.uid.JPEG2000,
    "dicom-rle": pydicom.uid.RLELossless,
    "dicom-jpegls": pydicom.uid.JPEGLSLossless,
    "dicom-jpeg": pydicom.uid.JPEGBaseline8Bit,
    "dicom-htj2k": pydicom.uid.HTJ2KLossless,
}


@pytest.fixture(scope="module")
def film():
    return render_film(1, positive=True, findings=(), shape=(700, 600), seed=3)


@pytest.mark.parametrize("fmt", DICOM_FORMATS)
def test_each_dicom_format_is_its_transfer_syntax_and_decodes_as_pydicom_does(film, fmt):
    data = encode_film(film, fmt, index=1, seed=3)
    assert data == encode_film(film, fmt, index=1, seed=3)  # same seed, same bytes
    ds = pydicom.dcmread(io.BytesIO(data))
    assert ds.file_meta.TransferSyntaxUID == SYNTAX[fmt]
    assert ds.Modality in ("CR", "DX") and ds.ViewPosition in ("PA", "AP")
    assert (ds.Rows, ds.Columns) == (700, 600) and ds.BodyPartExamined == "CHEST"
    assert 8 <= ds.BitsStored <= 16 and "WindowCenter" in ds
    # The full-resolution path is pydicom's pixel data through its own LUT functions.
    full = dicom.to_unit_gray(ds, max_pixels=10**8, modalities=None)
    expected = pydicom.pixels.apply_voi_lut(
        pydicom.pixels.apply_modality_lut(ds.pixel_array, ds).astype(float), ds
    )
    lo, hi = sorted(
        pydicom.pixels.apply_voi_lut(np.array([-1e12, 1e12]), ds).astype(float).tolist()
    )
    expected = (expected - lo) / (hi - lo)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        expected = 1 - expected
    np.testing.assert_allclose(full, expected, atol=1e-6)
    # Whatever the syntax, the film comes back (lossy ones within their loss).
    assert np.abs(full - film).mean() < 0.03


def test_dicom_attributes_vary_as_real_detectors_do(film):
    seen = {"bits": set(), "photometric": set(), "modality": set(), "rescaled": set()}
    for index in range(40):
        ds = pydicom.dcmread(io.BytesIO(encode_film(film[:64, :64], "dicom", index=index, seed=0)))
        seen["bits"].add(int(ds.BitsStored))
        seen["photometric"].add(ds.PhotometricInterpretation)
        seen["modality"].add(ds.Modality)
        seen["rescaled"].add("RescaleSlope" in ds)
    assert seen["bits"] <= set(range(10, 17)) and len(seen["bits"]) >= 3
    assert seen["photometric"] == {"MONOCHROME1", "MONOCHROME2"}
    assert seen["modality"] == {"CR", "DX"} and seen["rescaled"] == {True, False}


def test_mix_and_rectangular_detector_sizes(tmp_path):
    cfg = SynthConfig(out=str(tmp_path), n=24, size=300, height=360, mix=True, seed=2)
    formats = [film_format(cfg, i) for i in range(cfg.n)]
    assert len(set(formats)) >= 5 and set(formats) <= set(MIX)
    rows = write_archive(cfg)
    assert len(rows) == 24
    settings = decode.DecodeSettings(size=64)
    for (uri, _), fmt in zip(rows, formats, strict=True):
        data = open(uri, "rb").read()
        pixels, info = decode.decode_image(data, settings)
        assert pixels.shape == (64, 64) and pixels.std() > 5
        expected = (1024, 1024) if fmt == "png" else (360, 300)  # ChestX-ray14 PNGs: 1,024
        assert (info["rows"], info["columns"]) == expected, fmt
    again = tmp_path / "again"
    write_archive(SynthConfig(out=str(again), n=24, size=300, height=360, mix=True, seed=2))
    assert [open(u, "rb").read() for u, _ in rows] == [
        open(u.replace(str(tmp_path), str(again)), "rb").read() for u, _ in rows
    ]


def test_box_reduce_means_blocks_and_keeps_the_short_side():
    arr = np.arange(7 * 9, dtype=np.uint16).reshape(7, 9)
    out = pixel_data.box_reduce(arr, 3)  # k = 7 // 3 = 2: 4 x 5 blocks, the last ones ragged
    assert out.shape == (4, 5) and out.dtype == np.float32
    for i in range(4):
        for j in range(5):
            assert out[i, j] == pytest.approx(arr[2 * i : 2 * i + 2, 2 * j : 2 * j + 2].mean())
    assert pixel_data.box_reduce(arr, 7) is arr  # nothing to gain: the same array
    rgb = np.stack([arr, arr + 1, arr + 2], axis=-1)
    np.testing.assert_allclose(pixel_data.box_reduce(rgb, 3)[..., 2], out + 2)


def test_jpeg2000_sides_that_pillow_and_openjpeg_reduce_differently_still_decode(film):
    # 2,500 px at 16x: Pillow sizes the image 156 (rounded), OpenJPEG decodes 157
    # (ceiling) and Pillow's load failed. 260 at 16x is the same case, smaller.
    ds = pydicom.dcmread(io.BytesIO(encode_film(film[:260, :256], "dicom-j2k", index=1, seed=3)))
    frame = pixel_data._first_fragment(ds)
    reduced = pixel_data.reduced_j2k(frame, 16)
    # 16x would keep 16 >= 16 but is refused; 8x gives 33 x 32, then box-reduced.
    box = pixel_data.box_reduce(ds.pixel_array, 16)
    assert reduced.shape == box.shape == (17, 16)
    assert np.abs(reduced.astype(float) - box).mean() < 0.05 * 2**ds.BitsStored


@pytest.mark.parametrize("fmt", ["dicom-j2k", "dicom-htj2k", "dicom-j2k-lossy"])
def test_jpeg2000_drops_wavelet_levels_but_keeps_the_model_size(film, fmt):
    ds = pydicom.dcmread(io.BytesIO(encode_film(film, fmt, index=1, seed=3)))
    frame = pixel_data._first_fragment(ds)
    header = pixel_data.j2k_header(frame)
    assert (header.width, header.height, header.components) == (600, 700, 1)
    reduced = pixel_data.reduced_j2k(frame, 64)
    # 600 -> 300 -> 150 -> 75 still >= 64; one more level would give 38.
    assert reduced.shape == (88, 75)
    box = pixel_data.box_reduce(ds.pixel_array, 75)  # the same 8 x 8 reduction on full pixels
    assert box.shape == reduced.shape
    # A wavelet low-pass is not a box filter: close, not equal (2% of the range here).
    assert np.abs(reduced.astype(float) - box).mean() < 0.03 * 2**ds.BitsStored


def test_first_frame_only_of_a_multiframe_j2k():
    film = render_film(2, positive=False, findings=(), shape=(256, 256), seed=1)
    one = pydicom.dcmread(io.BytesIO(encode_film(film, "dicom-htj2k", index=2, seed=1)))
    # Append a second frame that cannot decode: only the first frame's fragments are read.
    ds = pydicom.dcmread(io.BytesIO(encode_film(film, "dicom-htj2k", index=2, seed=1)))
    first = pixel_data._first_fragment(ds)
    ds.PixelData = pydicom.encaps.encapsulate([first, b"\xff\x4f\xff\x51broken"])
    ds.NumberOfFrames = 2
    reduced = dicom.to_unit_gray(ds, max_pixels=10**8, modalities=None, target=64)
    single = dicom.to_unit_gray(one, max_pixels=10**8, modalities=None, target=64)
    np.testing.assert_array_equal(reduced, single)


def test_16_bit_png_reduced_shares_the_full_window(film):
    data = encode_png16(film)
    reduced, _ = decode.decode_image(data, decode.DecodeSettings(size=64))
    full, _ = decode.decode_image(data, decode.DecodeSettings(size=64, reduce=False))
    assert np.abs(reduced.astype(int) - full.astype(int)).mean() < 2.5  # 1% of the range
    assert Image.open(io.BytesIO(data)).mode == "I;16"


def test_16_bit_png_decodes_as_pillow_does(film):
    """imagecodecs decodes 16-bit grayscale PNGs (faster); its pixels are Pillow's, and
    a cut file is a one-line error, as it is with Pillow."""
    data = encode_png16(film)
    assert decode._is_gray16_png(data)
    settings = decode.DecodeSettings(size=64)
    ours, _ = decode.decode_image(data, settings)
    pillow = Image.open(io.BytesIO(data))
    pillow.load()
    np.testing.assert_array_equal(ours, decode.resize(decode._to_gray(pillow, 64), 64))
    np.testing.assert_array_equal(decode._png16_pixels(data, pillow), np.asarray(pillow))
    with pytest.raises(decode.DecodeError, match="^cannot decode PNG: ") as exc:
        decode.decode_image(data[: len(data) // 2], settings)
    assert "\n" not in str(exc.value)


@pytest.fixture(scope="module")
def mix_model(tmp_path_factory):
    """A seednet trained in this process on a mixed archive decoded by the reduced path
    (as meddx train decodes), and a held-out mixed archive with one detector-size film of
    every format."""
    torch = pytest.importorskip("torch")
    from meddx.imaging.transforms import TrainAugment, to_model_input
    from meddx.model import registry

    root = tmp_path_factory.mktemp("mix")
    size = 64

    def archive(name, n, seed, **kwargs):
        cfg = SynthConfig(out=str(root / name), n=n, seed=seed, mix=True, **kwargs)
        return [(open(u, "rb").read(), int(lbl == "opacity")) for u, lbl in write_archive(cfg)]

    def decoded(items, reduce):
        settings = decode.DecodeSettings(size=size, reduce=reduce)
        return np.stack([decode.decode_image(b, settings)[0] for b, _ in items])

    train = archive("train", 256, seed=21, size=640, height=768)
    x, y = decoded(train, reduce=True), np.array([t for _, t in train])
    torch.manual_seed(0)
    model = registry.build_model("seednet", 2)
    mean, std = torch.tensor(registry.IMAGENET_MEAN), torch.tensor(registry.IMAGENET_STD)
    epochs = 40
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)  # 3e-3 stalled at chance on some seeds
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    augment = TrainAugment()  # as meddx train augments
    gen = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for i in torch.randperm(len(x), generator=gen).split(32):
            batch = to_model_input(augment(torch.from_numpy(x[i.numpy()]), gen), mean, std)
            loss = torch.nn.functional.cross_entropy(model(batch), torch.from_numpy(y[i.numpy()]))
            opt.zero_grad()
            loss.backward()
            opt.step()
        schedule.step()
    ckpt = registry.make_checkpoint(
        model.eval(),
        model_name="seednet",
        class_names=["normal", "opacity"],
        positive_class="opacity",
        input_size=size,
    )
    held_out = archive("val", 120, seed=22, size=640, height=768)
    detector = []
    for k, fmt in enumerate(SYNTH_FORMATS):  # one 2,400 x 2,800 film of each format
        film = render_film(k, positive=bool(k % 2), findings=(), shape=(2800, 2400), seed=23)
        if fmt.startswith("dicom"):
            data = encode_film(film, fmt, index=k, seed=23)
        elif fmt == "png16":
            data = encode_png16(film)
        else:
            from meddx.synthetic.chest import encode

            data = encode((film * 255 + 0.5).astype(np.uint8), fmt)
        detector.append((data, k % 2))
    cfg = SynthConfig(out="x", n=120, seed=22, mix=True, size=640, height=768)
    formats = [film_format(cfg, i) for i in range(cfg.n)] + list(SYNTH_FORMATS)
    return ckpt, held_out + detector, decoded, formats


@pytest.mark.slow
def test_reduced_decoding_against_full_resolution(mix_model):
    """A model trained on reduced decodes ranks the held-out films (640 x 768 and one
    2,400 x 2,800 film per format, to 64 px: the reduction of a detector film to 224 px)
    as a full decode with the same final resize does: AUROC within 0.005. Films no codec
    can reduce give the same pixels either way, to rounding; JPEG 2000/HTJ2K and JPEG DCT
    scaling stay within a few grey levels. Per-film scores of this seednet still move by
    up to 0.07-0.15 on codec-reduced films (most on lossy JPEG 2000), over the 0.02 a site
    would want: the gap left in docs/benchmarks.md, not asserted away here."""
    from sklearn.metrics import roc_auc_score

    from meddx.inputs.storage import StorageSettings
    from meddx.model.predictor import Predictor

    ckpt, items, decoded, formats = mix_model
    labels = np.array([t for _, t in items])
    reduced_pixels, full_pixels = decoded(items, reduce=True), decoded(items, reduce=False)
    predictor = Predictor(ckpt, StorageSettings(), "fp32", "equivalence")
    reduced = predictor.predict_probs(reduced_pixels)[:, 1]
    full = predictor.predict_probs(full_pixels)[:, 1]
    auroc_full = roc_auc_score(labels, full)
    assert auroc_full > 0.9  # a model whose scores mean something (0.97 here)
    assert abs(roc_auc_score(labels, reduced) - auroc_full) <= 0.005
    for fmt, r, f in zip(formats, reduced_pixels.astype(int), full_pixels.astype(int), strict=True):
        if fmt in CODEC_REDUCED:
            assert np.abs(r - f).mean() < 8, fmt  # 3% of the range
        else:  # the box before or after linear LUTs: rounding apart, the same pixels
            assert np.abs(r - f).max() <= 1, fmt


@pytest.mark.parametrize(
    "fmt, reason",
    [
        ("dicom-rle", "truncated"),
        ("dicom-htj2k", "truncated"),
        ("dicom", "pixel data is less than expected"),
    ],
)
def test_a_cut_off_film_is_an_error_that_says_so(film, fmt, reason):
    data = encode_film(film, fmt, index=1, seed=3)
    with pytest.raises(decode.DecodeError) as caught:
        decode.decode_image(data[: len(data) // 2], decode.DecodeSettings(size=64))
    assert reason in str(caught.value) and "\n" not in str(caught.value)
