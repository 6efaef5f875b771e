"""Synthetic chest-X-ray-like archives with a learnable, subtle finding.

The images are built like a frontal radiograph: dark air, soft-tissue body, two dark
lung fields, a bright mediastinum, heart and spine, ribs and clavicles crossing the
lungs, vascular texture, quantum noise and detector blur, with random patient position
and exposure. An ``opacity`` image adds a soft, irregular increase in density inside one
lung field (a consolidation-like patch), weaker than a rib's contrast: a CNN has to learn
its shape and place, there is no marker pixel to find.

With ``findings`` the archive is multi-label: each finding is drawn on its own, with its
own prevalence, so they co-occur: ``opacity`` (as above), ``effusion`` (fluid density
filling one costophrenic angle, with a meniscus rising along the lateral chest wall: the
blunted angle of a small pleural effusion) and ``nodule`` (a small, round, well-defined
density in a lung field). The manifest then has one 0/1 column per finding.

Every image depends only on ``(seed, index)``: the same seed gives the same bytes.
"""

from __future__ import annotations

import csv
import io
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

import numpy as np
from PIL import Image
from scipy import ndimage

from meddx import MeddxError
from meddx.config import SynthConfig
from meddx.inputs import storage
from meddx.names import ABNORMAL, MANIFEST_NAME
from meddx.names import SINGLE_LABEL_CLASSES as CLASSES

# Findings a multi-label archive can draw, with their default prevalence (each finding
# independent of the others, so about 40% of films have none and some have several).
FINDINGS = {"opacity": 0.3, "effusion": 0.25, "nodule": 0.2}


def parse_prevalences(text: str) -> tuple[tuple[str, float], ...]:
    """``opacity,effusion=0.4,nodule`` (or ``all``) -> ((name, prevalence), ...)."""
    if text.strip().lower() == "all":
        return tuple(FINDINGS.items())
    out = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, _, rate = part.partition("=")
        name = name.strip().lower()
        if name not in FINDINGS:
            raise MeddxError(f"unknown finding {name!r}: use {', '.join(FINDINGS)} or all")
        try:
            prevalence = float(rate) if rate else FINDINGS[name]
        except ValueError:
            raise MeddxError(f"--findings {part!r}: the prevalence must be a number") from None
        out.append((name, prevalence))
    names = [n for n, _ in out]
    if not names or len(set(names)) != len(names):
        raise MeddxError("--findings needs one or more distinct findings, e.g. opacity,nodule")
    return tuple(out)


def _soft(inside: np.ndarray, edge: float) -> np.ndarray:
    """A smooth 0..1 mask from a signed 'how far inside' field (positive = inside)."""
    with np.errstate(over="ignore"):  # far outside: exp overflows to inf, the mask to 0
        return 1.0 / (1.0 + np.exp(-inside / edge))


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return field / (field.std() + 1e-8)


def render(
    index: int, *, positive: bool = False, size: int, seed: int, findings: tuple[str, ...] = ()
) -> np.ndarray:
    """One radiograph as uint8 (size x size); bright = dense (bone, tissue, fluid).

    ``positive`` is the single-label opacity; ``findings`` names the findings to draw.
    """
    unit = render_unit(index, positive=positive, shape=(size, size), seed=seed, findings=findings)
    return (np.clip(unit, 0, 1) * 255 + 0.5).astype(np.uint8)


def render_unit(
    index: int,
    *,
    positive: bool = False,
    shape: tuple[int, int],
    seed: int,
    findings: tuple[str, ...] = (),
) -> np.ndarray:
    """One radiograph of ``shape`` (rows, columns) as floats, about [0, 1], unclipped."""
    rows, cols = shape
    short = min(rows, cols)
    rng = np.random.default_rng([seed, index])
    # Patient position: shift, scale, small rotation (normalised coordinates in [-1, 1]
    # along the short side, so anatomy keeps its proportions on a rectangular film).
    if rows == cols:
        ys, xs = np.mgrid[-1 : 1 : short * 1j, -1 : 1 : short * 1j].astype(np.float32)
    else:
        ys, xs = np.meshgrid(
            np.linspace(-rows / short, rows / short, rows, dtype=np.float32),
            np.linspace(-cols / short, cols / short, cols, dtype=np.float32),
            indexing="ij",
        )
    angle = np.deg2rad(rng.uniform(-5, 5))
    scale = rng.uniform(0.9, 1.1)
    dx, dy = rng.uniform(-0.08, 0.08, size=2)
    x = (np.cos(angle) * xs + np.sin(angle) * ys) / scale - dx
    y = (-np.sin(angle) * xs + np.cos(angle) * ys) / scale - dy
    edge = 2.0 / short  # one pixel, so shapes are anti-aliased at any size

    body = _soft(1 - np.hypot(x / 0.86, (y - 0.25) / 1.2), 4 * edge)
    img = 0.04 + 0.5 * body

    # Lung fields: dark, slightly tilted ellipses with a domed base (the diaphragm).
    lung_w, lung_h = rng.uniform(0.25, 0.31), rng.uniform(0.5, 0.6)
    lungs, centres = [], []
    for side in (-1, 1):
        cx = side * rng.uniform(0.33, 0.4)
        lx = (x - cx) * np.cos(0.12 * side) - (y + 0.05) * np.sin(0.12 * side)
        ly = y + 0.05
        lungs.append(_soft(1 - np.hypot(lx / lung_w, ly / lung_h), 6 * edge))
        centres.append(cx)
    lung = np.maximum(*lungs)
    img -= 0.33 * lung * body

    # Mediastinum, heart (to the patient's left, the image's right) and spine.
    heart_x = rng.uniform(0.06, 0.14)
    img += 0.16 * _soft(1 - np.hypot((x - heart_x) / 0.3, (y - 0.32) / 0.26), 10 * edge)
    img += 0.14 * _soft(1 - np.hypot(x / 0.12, (y - 0.05) / 0.8), 8 * edge)
    img += 0.06 * _soft(0.04 - np.abs(x), edge) * body

    # Ribs: posterior arcs bending down laterally, and the two clavicles.
    # All ten ribs at once: distance to the nearest arc of a family spaced rib_gap apart.
    rib_gap = rng.uniform(0.1, 0.12)
    arc = -0.66 + 0.35 * np.maximum(np.abs(x) - 0.05, 0) ** 1.3
    t = (y - arc) / rib_gap
    nearest = np.round(t)
    on_rib = (nearest >= 0) & (nearest <= 9) & (np.abs(x) > 0.05) & (np.abs(x) < 0.74)
    band = _soft(0.018 - np.abs(t - nearest) * rib_gap, edge) * on_rib
    img += 0.08 * band * body
    for side in (-1, 1):
        clav = -0.72 + 0.18 * (side * x - 0.35) ** 2
        img += 0.1 * _soft(0.022 - np.abs(y - clav), edge) * (side * x > 0.05) * (side * x < 0.7)

    # Vascular markings: smooth texture, strongest inside the lungs.
    img += 0.025 * _smooth_noise(rng, shape, short / 90) * lung

    # Each finding has its own random stream: images of the same index with and without
    # a finding differ by that finding alone, which the tests use to check where it lies.
    if positive or "opacity" in findings:
        finding_rng = np.random.default_rng([seed, index, 1])
        img += _opacity(finding_rng, lungs[finding_rng.integers(2)], x, y)
    if "effusion" in findings:
        finding_rng = np.random.default_rng([seed, index, 2])
        side = finding_rng.integers(2)
        img += _effusion(finding_rng, lungs[side], (-1, 1)[side], centres[side], lung_w, x, y)
    if "nodule" in findings:
        finding_rng = np.random.default_rng([seed, index, 3])
        img += _nodule(finding_rng, lungs[finding_rng.integers(2)], x, y, edge)

    # Exposure (gamma, window), detector blur, quantum noise.
    img = np.clip(img, 0, 1) ** rng.uniform(0.8, 1.25)
    img = img * rng.uniform(0.85, 1.1) + rng.uniform(-0.05, 0.05)
    img = ndimage.gaussian_filter(img, max(short / 400, 0.5))
    img += rng.normal(0, 0.018, img.shape)
    return img


def _opacity(rng, lung_mask, x, y) -> np.ndarray:
    """A soft irregular patch of increased density inside ``lung_mask``."""
    candidates = np.argwhere(lung_mask > 0.95)
    cy, cx = candidates[rng.integers(len(candidates))]
    centre_x, centre_y = x[cy, cx], y[cy, cx]
    patch = np.zeros_like(x)
    for _ in range(rng.integers(2, 5)):
        ox, oy = rng.normal(0, 0.05, size=2)
        sigma = rng.uniform(0.08, 0.15)
        patch += np.exp(-((x - centre_x - ox) ** 2 + (y - centre_y - oy) ** 2) / (2 * sigma**2))
    patch /= patch.max()
    return rng.uniform(0.3, 0.42) * patch * lung_mask


def _effusion(rng, lung_mask, side, centre_x, lung_w, x, y) -> np.ndarray:
    """Fluid filling one costophrenic angle: the lung below a meniscus turns soft-tissue
    dense; the meniscus is lowest medially and rises along the lateral chest wall, so the
    sharp lateral angle of the lung's base is blunted."""
    base = y[lung_mask > 0.5].max()  # the lowest point of this lung field
    lateral = np.clip(side * (x - centre_x) / lung_w, -1, 1)  # -1 medial .. 1 lateral wall
    height = rng.uniform(0.14, 0.24)  # how far up the lateral wall the fluid climbs
    level = base - height * (0.15 + 0.85 * ((lateral + 1) / 2) ** 2)
    fluid = _soft(y - level, 0.012) * lung_mask
    return rng.uniform(0.22, 0.3) * fluid


def _nodule(rng, lung_mask, x, y, edge) -> np.ndarray:
    """A small, round, well-defined density in a lung field, away from its edge."""
    candidates = np.argwhere(lung_mask > 0.99)
    cy, cx = candidates[rng.integers(len(candidates))]
    radius = rng.uniform(0.035, 0.06)  # 0.6-1 cm on a 35 cm film
    r = np.hypot(x - x[cy, cx], y - y[cy, cx])
    return rng.uniform(0.2, 0.28) * _soft(radius - r, 1.5 * edge)


# Films larger than this are drawn at this short side and upsampled, with the quantum
# noise added at full size: the anatomy is smooth (1,024 px resolves ribs and nodules)
# and drawing 12 Mpx directly takes seconds per film.
DRAW_MAX = 1024

# ``--mix``: the formats of a realistic chest archive and their shares. PACS/VNA exports
# are mostly DICOM (uncompressed, JPEG 2000, JPEG-LS, some RLE and JPEG baseline), cloud
# DICOM stores hand out HTJ2K, research sets are JPEG (MIMIC-CXR-JPG, CheXpert), 16-bit
# PNG (PadChest) or 8-bit 1,024 px PNG (ChestX-ray14).
MIX = {
    "dicom": 0.20,
    "dicom-j2k": 0.15,
    "dicom-j2k-lossy": 0.10,
    "dicom-htj2k": 0.10,
    "dicom-jpegls": 0.10,
    "dicom-rle": 0.05,
    "dicom-jpeg": 0.05,
    "jpeg": 0.10,
    "png16": 0.10,
    "png": 0.05,
}
# ChestX-ray14's films are 1,024 x 1,024 8-bit PNGs, whatever size the rest of a mix has.
MIX_PNG_SIDE = 1024
EXTENSIONS = {"png": "png", "png16": "png", "jpeg": "jpg"}  # every other format: dcm


def extension(fmt: str) -> str:
    return EXTENSIONS.get(fmt, "dcm")


def film_format(cfg: SynthConfig, index: int) -> str:
    """The format of film ``index``: the archive's, or one drawn from MIX on its own stream."""
    if not cfg.mix:
        return cfg.format
    rng = np.random.default_rng([cfg.seed, 0x6D6978, index])  # "mix"
    return str(rng.choice(list(MIX), p=list(MIX.values())))


def film_shape(cfg: SynthConfig, fmt: str) -> tuple[int, int]:
    if cfg.mix and fmt == "png":
        return MIX_PNG_SIDE, MIX_PNG_SIDE
    return cfg.height or cfg.size, cfg.size


def render_film(
    index: int, *, positive: bool, findings: tuple[str, ...], shape: tuple[int, int], seed: int
) -> np.ndarray:
    """One film of ``shape`` as float32 in [0, 1]: drawn whole up to DRAW_MAX, else drawn
    at DRAW_MAX and upsampled, with fresh quantum noise at the detector's pixel pitch."""
    rows, cols = shape
    short = min(rows, cols)
    kwargs = {"positive": positive, "findings": findings, "seed": seed}
    if short <= DRAW_MAX:
        return np.clip(render_unit(index, shape=shape, **kwargs), 0, 1).astype(np.float32)
    drawn = render_unit(
        index, shape=(round(rows * DRAW_MAX / short), round(cols * DRAW_MAX / short)), **kwargs
    )
    big = Image.fromarray(drawn.astype(np.float32), mode="F").resize((cols, rows), Image.BICUBIC)
    film = np.array(big)
    film += 0.008 * np.random.default_rng([seed, index, 6]).standard_normal(shape, dtype=np.float32)
    return np.clip(film, 0, 1, out=film)


def _render_job(job: tuple) -> bytes:
    index, positive, findings, shape, seed, fmt = job
    if fmt in ("png", "jpeg") and shape[0] == shape[1] and shape[0] <= DRAW_MAX:
        # 8-bit films small enough to draw whole: the bytes meddx synth always wrote.
        pixels = render(index, positive=positive, findings=findings, size=shape[0], seed=seed)
        return encode(pixels, fmt)
    film = render_film(index, positive=positive, findings=findings, shape=shape, seed=seed)
    if fmt in ("png", "jpeg"):
        return encode((film * 255 + 0.5).astype(np.uint8), fmt)
    if fmt == "png16":
        return encode_png16(film)
    return encode_dicom(film, fmt, index=index, seed=seed)


def encode(pixels: np.ndarray, fmt: str) -> bytes:
    """8-bit PNG or JPEG bytes of uint8 pixels."""
    buf = io.BytesIO()
    if fmt == "png":
        Image.fromarray(pixels, mode="L").save(buf, format="PNG", compress_level=6)
    else:
        Image.fromarray(pixels, mode="L").save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def encode_png16(film: np.ndarray) -> bytes:
    """A 16-bit grayscale PNG (PadChest's exports use the full 16-bit range)."""
    buf = io.BytesIO()
    pixels = (film * 65535 + 0.5).astype(np.uint16)
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=6)  # mode I;16
    return buf.getvalue()


def encode_dicom(film: np.ndarray, fmt: str, *, index: int, seed: int) -> bytes:
    """A DICOM CR/DX object of ``film`` in the transfer syntax ``fmt`` names."""
    from meddx.synthetic.dicom_film import encode_film

    return encode_film(film, fmt, index=index, seed=seed)


def labels_for(n: int, positive_rate: float, seed: int) -> list[str]:
    """Exactly round(n * rate) positives in a seeded order, so small archives have both classes."""
    n_pos = round(n * positive_rate)
    labels = np.array([CLASSES[1]] * n_pos + [CLASSES[0]] * (n - n_pos))
    # Its own stream ("labe" in ASCII), apart from every image's [seed, index, ...].
    np.random.default_rng([seed, 0x6C616265, 2]).shuffle(labels)
    return labels.tolist()


def finding_labels(n: int, findings: tuple[tuple[str, float], ...], seed: int) -> np.ndarray:
    """(n, len(findings)) 0/1: each finding's exact count, shuffled on its own stream, so
    findings fall independently of one another and co-occur by chance."""
    columns = []
    for k, (_, prevalence) in enumerate(findings):
        column = np.zeros(n, dtype=np.int8)
        column[: round(n * prevalence)] = 1
        np.random.default_rng([seed, 0x6C616265, 3, k]).shuffle(column)
        columns.append(column)
    return np.stack(columns, axis=1)


def write_archive(cfg: SynthConfig) -> list[tuple[str, str]]:
    """Write ``OUT/<class>/<id>.<ext>`` and ``OUT/_manifest.csv``; return (uri, label) rows.

    Multi-label (``cfg.findings``): the class folder is ``normal`` or ``abnormal`` (any
    finding), and the manifest adds one 0/1 column per finding.
    """
    out = cfg.out if storage.is_s3(cfg.out) else storage.strip_scheme(cfg.out)

    names = [name for name, _ in cfg.findings]
    if names:
        truth = finding_labels(cfg.n, cfg.findings, cfg.seed)
        labels = [ABNORMAL if row.any() else CLASSES[0] for row in truth]
        drawn = [tuple(n for n, t in zip(names, row, strict=True) if t) for row in truth]
        positives = [False] * cfg.n
    else:
        labels = labels_for(cfg.n, cfg.positive_rate, cfg.seed)
        drawn = [()] * cfg.n
        positives = [label == CLASSES[1] for label in labels]
    formats = [film_format(cfg, i) for i in range(cfg.n)]
    jobs = [
        (i, positives[i], drawn[i], film_shape(cfg, fmt), cfg.seed, fmt)
        for i, fmt in enumerate(formats)
    ]
    uris = [
        storage.join(out, label, f"cxr-{i:06d}.{extension(fmt)}")
        for i, (label, fmt) in enumerate(zip(labels, formats, strict=True))
    ]
    # Rendering is CPU-bound numpy: spread it over processes ("spawn" is safe beside the
    # threads of a Ray driver or an S3 server); uploads overlap in a thread pool.
    # Processes pay off from 32 small films, or from 2 detector-size ones (seconds each).
    big = max(np.prod(film_shape(cfg, fmt)) for fmt in set(formats)) > DRAW_MAX**2
    workers = min(os.cpu_count() or 1, max(1, cfg.n // (2 if big else 32)))
    with ThreadPoolExecutor(max_workers=8) as uploads:
        if workers > 1:
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
                blobs = pool.map(_render_job, jobs, chunksize=1 if big else 16)
                done = [
                    uploads.submit(storage.write_bytes, u, b, cfg.storage)
                    for u, b in zip(uris, blobs, strict=True)
                ]
        else:
            done = [
                uploads.submit(storage.write_bytes, u, _render_job(j), cfg.storage)
                for u, j in zip(uris, jobs, strict=True)
            ]
        for future in done:
            future.result()
    rows = list(zip(uris, labels, strict=True))

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["uri", "label", *names])
    if names:
        writer.writerows((u, lbl, *t) for (u, lbl), t in zip(rows, truth.tolist(), strict=True))
    else:
        writer.writerows(rows)
    storage.write_bytes(storage.join(out, MANIFEST_NAME), buf.getvalue().encode(), cfg.storage)
    return rows
