"""Bytes -> model-ready pixels. Errors are values, never exceptions that kill a block.

Formats are detected from the bytes (magic numbers, or a DICOM dataset that parses
without its preamble), not from the object's name. DICOM handling is in ``dicom.py``.
Output pixels are uint8 grayscale at the model's input size: 8-bit images keep their
values, 16-bit images are windowed to their full stored range first. uint8 between
stages keeps Ray's object store traffic at 50 KB per 224 px image.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from meddx import one_line
from meddx.imaging import dicom
from meddx.imaging.attributes import DicomError
from meddx.imaging.pixel_data import box_reduce
from meddx.imaging.rules import DEFAULT as DEFAULT_RULES
from meddx.imaging.rules import RuleSet
from meddx.names import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MODALITIES,
    DEFAULT_VIEWS,
    QC_LOW_QUALITY,
    QC_OK,
    QC_WRONG_VIEW,
)


class Skipped(Exception):
    """An image the run's rules select out: its row is "skipped", with this reason (the
    rule, never a value) and what the header said of it."""

    def __init__(self, reason: str, info: dict):
        super().__init__(reason)
        self.info = info


class DecodeError(Exception):
    """Why one input could not be turned into pixels (one line, no patient data)."""


# Columns every decoded row carries (strings "" and ints 0 when unknown: an all-None
# column does not survive Ray's Arrow conversion as None).
INFO_DEFAULTS = {
    "modality": "",
    "view_position": "",
    "body_part": "",
    "photometric": "",
    "transfer_syntax": "",
    "rows": 0,
    "columns": 0,
    "frames": 0,
    "study_pseudonym": "",
    "series_pseudonym": "",
    "instance_pseudonym": "",
}


@dataclass(frozen=True)
class DecodeSettings:
    size: int = 224
    max_pixels: int = DEFAULT_MAX_PIXELS
    modalities: tuple[str, ...] | None = DEFAULT_MODALITIES  # None: any DICOM modality
    views: tuple[str, ...] | None = DEFAULT_VIEWS  # DICOM ViewPosition values; None: any
    # Selection rules on the header (imaging/rules.py), checked before any pixel.
    rules: RuleSet = DEFAULT_RULES
    pseudonym_key: bytes | None = field(default=None, repr=False)  # HMAC key for UIDs
    # Decode only the resolution the model needs (False: every film at full size, the
    # reference the reduced path is checked against).
    reduce: bool = True
    # Squash to size x size, as models take films; False: keep the film's aspect with its
    # short side at ``size``, as a store of films keeps them (``meddx prepare``).
    square: bool = True

    @property
    def target(self) -> int | None:
        """The short side decoders may reduce a film to, or None for full size."""
        return self.size if self.reduce else None


def sniff(data: bytes) -> str | None:
    """The image format from its first bytes, or None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    if dicom.looks_like_dicom(data):
        return "dicom"
    return None


def _is_gray16_png(data: bytes) -> bool:
    """A 16-bit grayscale PNG (IHDR: bit depth 16, colour type 0), as PadChest's are."""
    return len(data) > 25 and data[12:16] == b"IHDR" and data[24] == 16 and data[25] == 0


def _png16_pixels(data: bytes, img: Image.Image) -> np.ndarray:
    """A 16-bit grayscale PNG's values. imagecodecs' libpng (zlib-ng inflate) decodes a
    2,400 x 2,800 film in 84 ms against Pillow's 112; Pillow stands in without it."""
    try:
        import imagecodecs
    except ImportError:
        img.load()
        return np.asarray(img)
    pixels = imagecodecs.png_decode(data)
    if pixels.shape != (img.height, img.width):
        raise DecodeError(f"PNG holds {pixels.shape} values, its header says {img.size}")
    return pixels


def _unit_gray(pixels: np.ndarray, target: int | None) -> np.ndarray:
    """High-bit-depth values as float32 in [0, 1], box-reduced to a short side of at
    least ``target``. The film's full range of values is the window, as DICOM does when
    no VOI is given: taken before reduction, so reduced and full decodes share one."""
    lo, hi = float(pixels.min()), float(pixels.max())
    if target:
        pixels = box_reduce(pixels, target)
    pixels = pixels.astype(np.float32, copy=False)
    return (pixels - lo) / (hi - lo) if hi > lo else np.zeros_like(pixels)


def _to_gray(img: Image.Image, target: int | None) -> np.ndarray | Image.Image:
    """8-bit modes stay a PIL image in mode L; high-bit-depth modes become float32 in
    [0, 1]. Either is first box-reduced to a short side of at least ``target``."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return _unit_gray(np.asarray(img), target)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA").convert("RGB")  # alpha carries no density: drop it
    gray = img.convert("L")
    factor = min(gray.size) // target if target else 1
    return gray.reduce(factor) if factor > 1 else gray


def decode_image(data: bytes, settings: DecodeSettings) -> tuple[np.ndarray, dict]:
    """Decode PNG, JPEG or DICOM bytes into (size, size) uint8 pixels and info columns.

    Raises DecodeError with a one-line reason for anything that cannot be scored.
    """
    if not data:
        raise DecodeError("empty object (0 bytes)")
    fmt = sniff(data)
    if fmt is None:
        raise DecodeError("not a PNG, JPEG or DICOM image (unrecognised leading bytes)")
    if fmt == "dicom":
        return _decode_dicom(data, settings)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=[fmt.upper()])
            width, height = img.size
            if width * height > settings.max_pixels:
                raise DecodeError(
                    f"{width}x{height} pixels exceeds the limit of {settings.max_pixels:,}"
                    " (possible decompression bomb)"
                )
            if fmt == "jpeg" and settings.reduce:
                # Let libjpeg decode at a reduced DCT scale when the target is much smaller.
                img.draft("L", (settings.size, settings.size))
            if fmt == "png" and _is_gray16_png(data):
                gray = _unit_gray(_png16_pixels(data, img), settings.target)
            else:
                img.load()
                gray = _to_gray(img, settings.target)
    except DecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DecodeError(f"decompression bomb refused: {one_line(exc)}") from exc
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, zlib.error...
        raise DecodeError(f"cannot decode {fmt.upper()}: {one_line(exc)}") from exc
    info = {**INFO_DEFAULTS, "rows": height, "columns": width, "frames": 1}
    return resize(gray, settings.size, settings.square), info


def _decode_dicom(data: bytes, settings: DecodeSettings) -> tuple[np.ndarray, dict]:
    try:
        with dicom.silenced():
            return _dicom_pixels(data, settings)
    except Skipped:
        raise
    except DicomError as exc:
        raise DecodeError(str(exc)) from None
    except Exception as exc:  # whatever else a broken file provokes: its type, no values
        raise DecodeError(f"cannot decode DICOM ({type(exc).__name__})") from None


def _dicom_pixels(data: bytes, settings: DecodeSettings) -> tuple[np.ndarray, dict]:
    ds = dicom.parse(data)
    info = {**INFO_DEFAULTS, **dicom.attributes(ds, settings.pseudonym_key)}
    refused = selected_out(ds, settings)
    if refused:
        raise Skipped(refused, info)
    unit = dicom.to_unit_gray(
        ds, max_pixels=settings.max_pixels, modalities=settings.modalities, target=settings.target
    )
    return resize(unit, settings.size, settings.square), info


def selected_out(ds, settings: DecodeSettings) -> str | None:
    """Why the run's rules or its modalities select ``ds`` out, or None (before any
    pixel). The rules first: "not an image" says more of an SR than its modality."""
    refused = settings.rules.refused(ds)
    if refused:
        return refused
    try:
        modality = dicom.code(ds, "Modality")
    except DicomError:
        modality = ""
    refused = dicom.refused_modality(modality, settings.modalities)
    return f'rule "modality": {refused}' if refused else None


def fitted(width: int, height: int, size: int, square: bool = True) -> tuple[int, int]:
    """(width, height) after ``resize``: size x size, or the short side at ``size``."""
    if square:
        return size, size
    short = min(width, height)
    return max(1, round(width * size / short)), max(1, round(height * size / short))


def resize(gray: np.ndarray | Image.Image, size: int, square: bool = True) -> np.ndarray:
    """Squash to size x size (keeps both lung fields whole; radiographs are near-square),
    or with ``square`` False scale to a short side of ``size``, keeping the aspect.

    The one resize every film goes through, reduced or not: a box reduction by the largest
    integer factor that keeps the short side >= size, then an antialiased bilinear step
    of less than 2x. A film already reduced by its decoder skips the first step, so a
    reduced decode and a full one meet the same filter."""
    if isinstance(gray, np.ndarray):
        img = Image.fromarray(box_reduce(gray, size).astype(np.float32), mode="F")
        out = np.asarray(img.resize(fitted(*img.size, size, square), Image.BILINEAR))
        return (np.clip(out, 0, 1) * 255 + 0.5).astype(np.uint8)
    factor = min(gray.size) // size
    if factor > 1:
        gray = gray.reduce(factor)
    target = fitted(*gray.size, size, square)
    return np.asarray(gray.resize(target, Image.BILINEAR), dtype=np.uint8)


# Low quality, judged on the model's own input (after the VOI window, at input size), in
# 8-bit levels. Synthetic and real films keep a standard deviation of 30-60 levels, a
# 1st-99th percentile span of 100 or more and under a third of their pixels at the ends
# of the scale (collimation and burned-out soft tissue), so these limits flag only
# images no reader could use.
MIN_STD = 6.0  # near-constant: a blank or failed exposure
MIN_SPAN = 24  # the 1st-99th percentile span of an extreme low-contrast film
MAX_CLIPPED = 0.6  # the share of pixels at 0-2 or 253-255 of a saturated film


def pixel_figures(image: np.ndarray) -> dict[str, float]:
    """What the quality check reads of a uint8 image: its standard deviation, its 1st and
    99th percentiles, and the share of its pixels at the ends of the scale."""
    counts = np.bincount(image.ravel(), minlength=256)  # one pass; the rest is 256 levels
    n = image.size
    levels = np.arange(256, dtype=np.float64)
    mean = counts @ levels / n
    below = np.cumsum(counts)

    def percentile(q: float) -> float:  # numpy's default (linear between order statistics)
        h = (n - 1) * q / 100
        k = int(h)
        lo = int(np.searchsorted(below, k, side="right"))
        hi = int(np.searchsorted(below, min(k + 1, n - 1), side="right"))
        return lo + (h - k) * (hi - lo)

    return {
        "pixel_std": float(np.sqrt(counts @ (levels - mean) ** 2 / n)),
        "pixel_p01": percentile(1),
        "pixel_p99": percentile(99),
        "pixel_clipped": float((counts[:3].sum() + counts[253:].sum()) / n),
    }


def quality_check(image: np.ndarray) -> str | None:
    """Why ``image`` (uint8, the model's input) is too poor to score, or None."""
    figures = pixel_figures(image)
    if figures["pixel_std"] < MIN_STD:
        return "near-constant"
    if figures["pixel_p99"] - figures["pixel_p01"] < MIN_SPAN:
        return "low contrast"
    if figures["pixel_clipped"] > MAX_CLIPPED:
        return "saturated"
    return None


def qc_of(image: np.ndarray, info: dict, settings: DecodeSettings) -> str:
    """The checks that need no model: the DICOM view, then the pixels."""
    view = (info.get("view_position") or "").upper()
    if settings.views and view and view not in settings.views:
        return QC_WRONG_VIEW
    return QC_LOW_QUALITY if quality_check(image) else QC_OK


def decode_each(
    batch: dict[str, np.ndarray], settings: DecodeSettings
) -> Iterator[tuple[np.ndarray | None, dict, str, str]]:
    """(pixels, info, "", "ok") per row of a read batch; (None, info, reason, "skipped")
    for an image the rules select out; (None, INFO_DEFAULTS, reason, "error") for a row
    that could not be read or decoded: one input's failure is its own row."""
    for data, read_error in zip(batch["bytes"], batch["read_error"], strict=True):
        if read_error:
            yield None, INFO_DEFAULTS, read_error, "error"
            continue
        try:
            pixels, info = decode_image(data, settings)
        except Skipped as exc:
            yield None, exc.info, str(exc), "skipped"
        except DecodeError as exc:
            yield None, INFO_DEFAULTS, str(exc), "error"
        except Exception as exc:  # whatever else: its type, never the block's failure
            yield None, INFO_DEFAULTS, f"decoding failed ({type(exc).__name__})", "error"
        else:
            yield pixels, info, "", "ok"


def decoded_columns(
    passthrough: dict[str, np.ndarray],
    images: np.ndarray,
    errors: list[str],
    qc: list[str],
    infos: list[dict],
    skipped: list[bool] | None = None,
) -> dict[str, np.ndarray]:
    """The decode stage's batch: the columns carried through, the model-size images,
    status (ok, error, or skipped where ``skipped`` says), error, qc and the info
    columns ("" and 0 for unknown)."""
    skipped = skipped or [False] * len(errors)
    return {
        **passthrough,
        "image": images,
        "status": np.array(
            [
                "skipped" if k else "error" if e else "ok"
                for e, k in zip(errors, skipped, strict=True)
            ],
            dtype=object,
        ),
        "error": np.array(errors, dtype=object),
        "qc": np.array(qc, dtype=object),
        **{
            name: np.array(
                [info.get(name, default) for info in infos],
                dtype=np.int64 if isinstance(default, int) else object,
            )
            for name, default in INFO_DEFAULTS.items()
        },
    }


def decode_images(batch: dict[str, np.ndarray], settings: DecodeSettings) -> dict[str, np.ndarray]:
    """Bytes -> uint8 (size, size) pixels, status, error and info columns per input."""
    n = len(batch["image_uri"])
    images = np.zeros((n, settings.size, settings.size), dtype=np.uint8)
    errors, infos, qc, skipped = [], [], [], []
    for i, (pixels, info, error, status) in enumerate(decode_each(batch, settings)):
        checked = ""
        if pixels is not None:
            try:
                checked = qc_of(pixels, info, settings)
            except Exception as exc:  # one input's failure is its own row
                error, info = f"decoding failed ({type(exc).__name__})", INFO_DEFAULTS
            else:
                images[i] = pixels
        errors.append(error)
        infos.append(info)
        qc.append(checked)
        skipped.append(status == "skipped")
    passthrough = {k: v for k, v in batch.items() if k not in ("bytes", "read_error")}
    return decoded_columns(passthrough, images, errors, qc, infos, skipped)
