"""The DICOM attributes meddx reads, each checked once by name.

Any attribute of any file may be missing, multi-valued, of the wrong type (a broken or
hostile writer may give Rows the VR LO), empty, negative or absurd. Each reader gives a
clean value or raises DicomError naming the attribute, never its value: the file
decides nothing but its own row. Imports pydicom only (dicom.py and pixel_data.py build
on this).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import pydicom
from pydicom.dataset import Dataset


class DicomError(Exception):
    """Why a DICOM object cannot be scored (one line, no identifying values)."""


# DICOM PS3.5 code strings (CS: upper-case letters, digits, space, underscore; 16
# characters). Stored values are compared upper-cased and stripped, as archives hold
# "pa" and "CHEST " too; anything else (a formula, a name) is not a code string.
CODE_STRING = re.compile(r"[A-Z0-9 _]{0,16}")
UID = re.compile(r"[0-9.]{1,64}")  # PS3.5 UI
PHOTOMETRIC = {
    "MONOCHROME1",
    "MONOCHROME2",
    "PALETTE COLOR",
    "RGB",
    "YBR_FULL",
    "YBR_FULL_422",
    "YBR_PARTIAL_420",
    "YBR_ICT",
    "YBR_RCT",
}


def values(ds: Dataset, keyword: str) -> list:
    """Every value of ``keyword``; [] when absent or empty."""
    try:
        value = ds.get(keyword)
    except Exception as exc:  # pydicom converts raw values on access
        raise DicomError(f"{keyword} cannot be read ({type(exc).__name__})") from None
    if value is None or (isinstance(value, str | bytes) and not value.strip()):
        return []
    return list(value) if isinstance(value, list | tuple | pydicom.multival.MultiValue) else [value]


def single(ds: Dataset, keyword: str):
    """The one value of ``keyword``, or None when absent or empty."""
    found = values(ds, keyword)
    if len(found) > 1:
        raise DicomError(f"{keyword} holds {len(found)} values where one is expected")
    return found[0] if found else None


def integer(ds: Dataset, keyword: str, default: int | None, low: int, high: int) -> int:
    """An integer attribute within [low, high]; ``default`` when absent (None: required)."""
    value = single(ds, keyword)
    if value is None:
        if default is None:
            raise DicomError(f"{keyword} is missing")
        return default
    try:
        number = float(value) if not isinstance(value, int) else value
        if isinstance(number, float):
            if not number.is_integer():
                raise ValueError
            number = int(number)
    except (TypeError, ValueError, OverflowError):
        raise DicomError(f"{keyword} is not an integer") from None
    if not low <= number <= high:
        raise DicomError(f"{keyword} is out of range ({low} to {high})")
    return number


def decimals(ds: Dataset, keyword: str) -> list[float]:
    """A decimal attribute's values (VM 1-n), all finite; [] when absent."""
    try:
        numbers = [float(v) for v in values(ds, keyword)]
    except (TypeError, ValueError, OverflowError):
        raise DicomError(f"{keyword} is not a number") from None
    if not all(math.isfinite(n) for n in numbers):
        raise DicomError(f"{keyword} is not a finite number")
    return numbers


def code(ds: Dataset, keyword: str) -> str:
    """A code string (CS), upper-cased and stripped; "" when absent."""
    return _matching(ds, keyword, CODE_STRING, "a DICOM code string", upper=True)


def uid(ds: Dataset, keyword: str) -> str:
    """A UID (UI), stripped; "" when absent."""
    return _matching(ds, keyword, UID, "a UID")


def _matching(ds: Dataset, keyword: str, pattern: re.Pattern, what: str, upper=False) -> str:
    value = single(ds, keyword)
    if value is None:
        return ""
    text = value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)
    text = text.strip(" \x00")
    text = text.upper() if upper else text
    if not pattern.fullmatch(text):
        raise DicomError(f"{keyword} is not {what}")
    return text


@dataclass(frozen=True)
class Geometry:
    """The attributes that say how to read a frame, checked."""

    rows: int
    columns: int
    samples: int
    bits_allocated: int
    bits_stored: int
    signed: bool
    frames: int
    photometric: str


def geometry(ds: Dataset) -> Geometry:
    """Rows, Columns, samples, bits, frames and photometric interpretation, checked
    (DicomError naming the first attribute that is missing or malformed)."""
    rows = integer(ds, "Rows", None, 1, 65535)
    columns = integer(ds, "Columns", None, 1, 65535)
    samples = integer(ds, "SamplesPerPixel", 1, 1, 3)
    if samples == 2:
        raise DicomError("SamplesPerPixel is neither 1 nor 3")
    allocated = integer(ds, "BitsAllocated", None, 1, 64)
    if allocated not in (1, 8, 16, 32, 64):
        raise DicomError("BitsAllocated is not 1, 8, 16, 32 or 64")
    stored = integer(ds, "BitsStored", allocated, 1, allocated)
    integer(ds, "HighBit", stored - 1, 0, allocated - 1)
    signed = integer(ds, "PixelRepresentation", 0, 0, 1) == 1
    photometric = code(ds, "PhotometricInterpretation") or "MONOCHROME2"
    if photometric not in PHOTOMETRIC:
        raise DicomError("PhotometricInterpretation is not one meddx reads")
    if (samples == 3) != (
        photometric in PHOTOMETRIC - {"MONOCHROME1", "MONOCHROME2", "PALETTE COLOR"}
    ):
        raise DicomError("SamplesPerPixel does not fit PhotometricInterpretation")
    return Geometry(rows, columns, samples, allocated, stored, signed, frames(ds), photometric)


def check_luts(ds: Dataset) -> None:
    """The modality and VOI transforms' attributes: finite rescale, windows with a width,
    LUT items with a descriptor of three sane values and their data."""
    for keyword in ("RescaleSlope", "RescaleIntercept"):
        if len(decimals(ds, keyword)) > 1:
            raise DicomError(f"{keyword} holds several values where one is expected")
    centers, widths = decimals(ds, "WindowCenter"), decimals(ds, "WindowWidth")
    if bool(centers) != bool(widths):
        raise DicomError("WindowCenter and WindowWidth come only together")
    if widths and widths[0] <= 0:
        raise DicomError("WindowWidth is not positive")
    function = code(ds, "VOILUTFunction")
    if function not in ("", "LINEAR", "LINEAR_EXACT", "SIGMOID"):
        raise DicomError("VOILUTFunction is not LINEAR, LINEAR_EXACT or SIGMOID")
    if function != "LINEAR_EXACT" and widths and widths[0] < 1:
        raise DicomError("WindowWidth is under 1")
    for keyword in ("ModalityLUTSequence", "VOILUTSequence"):
        if keyword in ds:
            _check_lut_item(ds, keyword)


def _check_lut_item(ds: Dataset, keyword: str) -> None:
    try:
        items = ds[keyword].value
        item = items[0] if len(items) else None
    except Exception as exc:
        raise DicomError(f"{keyword} cannot be read ({type(exc).__name__})") from None
    if item is None:
        raise DicomError(f"{keyword} holds no item")
    try:
        descriptor = [int(v) for v in item.get("LUTDescriptor") or []]
    except (TypeError, ValueError, OverflowError):
        raise DicomError(f"{keyword}'s LUTDescriptor is not three integers") from None
    if len(descriptor) != 3:
        raise DicomError(f"{keyword}'s LUTDescriptor is not three integers")
    if not 0 <= descriptor[0] <= 65535 or not 1 <= descriptor[2] <= 16:
        raise DicomError(f"{keyword}'s LUTDescriptor is out of range")
    if "LUTData" not in item or not item.LUTData:
        raise DicomError(f"{keyword} has no LUTData")


def frames(ds: Dataset) -> int:
    """NumberOfFrames (IS); absent or 0 is one frame, as pydicom reads it."""
    return max(1, integer(ds, "NumberOfFrames", 1, 0, 2**31 - 1))
