"""The quality-control evaluation set: held-out chest films and images that are not.

    meddx synth OUT --quality-set --n 200 --size 256 --seed 7

writes under OUT, with ``OUT/_manifest.csv`` (uri, label, in_distribution, category):

- ``chest``: synthetic chest films as ``meddx synth`` draws them (in_distribution 1,
  labelled normal or opacity), PNG and DICOM (ViewPosition PA or AP);
- ``lateral``: the same films as DICOM with ViewPosition LL: a view a frontal model
  was not trained on;
- ``inverted`` and ``rotated``: chest films read with the wrong photometric
  interpretation, or turned by 90, 180 or 270 degrees;
- ``blank`` and ``noise``: uniform exposures and random noise;
- ``text``: rendered pages of text (a scanned request form);
- ``photo``: crops of the photographs matplotlib ships (its sample data);
- ``dicom-CT``, ``dicom-MR``, ...: every non-radiograph image in pydicom's own test
  corpus that decodes (CT, MR, US, secondary captures, ...).

Nothing here was drawn to fool or to suit the checks: the non-chest pixels come from
packages (pydicom, matplotlib) or from plain transforms of the chest films. ``meddx
evaluate --labels OUT/_manifest.csv`` reports how many of each are flagged.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from meddx.inputs import storage
from meddx.inputs.storage import StorageSettings
from meddx.names import MANIFEST_NAME, SINGLE_LABEL_CLASSES
from meddx.synthetic.chest import encode, encode_dicom, labels_for, render

PHOTOS = ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png", "logo2.png")
WORDS = (
    "patient referral request chest radiograph history cough fever clinical findings "
    "please compare prior study signature date department ward consultant urgent routine "
    "indication allergy contrast consent form page of report"
).split()


def _png(pixels: np.ndarray) -> bytes:
    return encode(np.ascontiguousarray(pixels, dtype=np.uint8), "png")


def _dicom_view(film: np.ndarray, view: str, index: int, seed: int) -> bytes:
    import pydicom

    data = encode_dicom(film.astype(np.float32) / 255, "dicom", index=index, seed=seed)
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.ViewPosition = view
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _text_page(rng: np.random.Generator, size: int) -> np.ndarray:
    page = Image.new("L", (size, round(size * 1.41)), color=int(rng.integers(225, 256)))
    draw = ImageDraw.Draw(page)
    font = ImageFont.load_default(size=max(8, size // 28))
    y = size // 12
    while y < page.height - size // 12:
        line = " ".join(rng.choice(WORDS, size=int(rng.integers(3, 9))))
        draw.text((size // 12, y), line, fill=int(rng.integers(0, 60)), font=font)
        y += int(size / 20 * rng.uniform(1.0, 1.6))
    return np.asarray(page)


def _photo_crops(rng: np.random.Generator, n: int) -> list[np.ndarray]:
    from matplotlib import cbook

    sources = [np.asarray(Image.open(cbook.get_sample_data(name)).convert("L")) for name in PHOTOS]
    crops = []
    for k in range(n):
        img = sources[k % len(sources)]
        h, w = img.shape
        side = int(min(h, w) * rng.uniform(0.5, 1.0))
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = img[y : y + side, x : x + side]
        crops.append(crop[:, ::-1] if rng.random() < 0.5 else crop)
    return crops


def pydicom_non_radiographs() -> list[tuple[str, bytes]]:
    """(modality, bytes) of each distinct image in pydicom's shipped test files that
    decodes and is not a radiograph (CR, DX)."""
    import warnings

    import pydicom
    from pydicom.data import get_testdata_files

    found, seen = [], set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in sorted(get_testdata_files("*.dcm")):
            try:
                ds = pydicom.dcmread(path)
                modality = str(ds.get("Modality", "") or "OT")
                if modality in ("CR", "DX") or "PixelData" not in ds:
                    continue
                ds.pixel_array  # noqa: B018 - only images that decode
            except Exception:
                continue
            # One of each image: the corpus holds the same picture in many syntaxes.
            key = (modality, ds.get("Rows"), ds.get("Columns"), ds.get("NumberOfFrames"))
            if key not in seen:
                seen.add(key)
                found.append((modality, Path(path).read_bytes()))
    return found


def write_quality_set(
    out: str, n: int, size: int, seed: int, settings: StorageSettings
) -> list[dict]:
    """Write the set under OUT and its manifest; return the manifest's rows."""
    rng = np.random.default_rng([seed, 0x7163])  # "qc"
    rows: list[dict] = []

    def put(category: str, name: str, data: bytes, inside: int, label: str = "") -> None:
        uri = storage.join(out, category, name)
        storage.write_bytes(uri, data, settings)
        rows.append({"uri": uri, "label": label, "in_distribution": inside, "category": category})

    labels = labels_for(n, 0.5, seed)
    films = [
        render(i, positive=labels[i] == SINGLE_LABEL_CLASSES[1], size=size, seed=seed)
        for i in range(n)
    ]
    for i, film in enumerate(films):  # every fourth as a frontal DICOM
        if i % 4 == 3:
            view = "PA" if i % 8 == 3 else "AP"
            put("chest", f"cxr-{i:05d}.dcm", _dicom_view(film, view, i, seed), 1, labels[i])
        else:
            put("chest", f"cxr-{i:05d}.png", _png(film), 1, labels[i])
    others = max(3, n // 4)  # of each kind that is not an in-distribution chest film
    for k in range(others):
        film = films[k % n]
        put("lateral", f"lat-{k:05d}.dcm", _dicom_view(film, "LL", k, seed), 0)
        put("inverted", f"inv-{k:05d}.png", _png(255 - film), 0)
        put("rotated", f"rot-{k:05d}.png", _png(np.rot90(film, 1 + k % 3)), 0)
        level = int(rng.integers(0, 256))
        put("blank", f"blank-{k:05d}.png", _png(np.full((size, size), level)), 0)
        noise = rng.integers(0, 256, (size, size))
        put("noise", f"noise-{k:05d}.png", _png(noise), 0)
        put("text", f"page-{k:05d}.png", _png(_text_page(rng, size)), 0)
    for k, crop in enumerate(_photo_crops(rng, others)):
        put("photo", f"photo-{k:05d}.png", _png(crop), 0)
    for k, (modality, data) in enumerate(pydicom_non_radiographs()):
        put(f"dicom-{modality}", f"pydicom-{k:03d}.dcm", data, 0)

    buf = io.StringIO()
    writer = csv.DictWriter(
        buf, ["uri", "label", "in_distribution", "category"], lineterminator="\n"
    )
    writer.writeheader()
    writer.writerows(rows)
    storage.write_bytes(storage.join(out, MANIFEST_NAME), buf.getvalue().encode(), settings)
    return rows
