"""DICOM -> grayscale in [0, 1] with bone bright, plus the attributes that may leave the job.

The order is the one pydicom documents for display: stored pixel data -> modality LUT
(Rescale Slope/Intercept or a Modality LUT Sequence) -> VOI LUT (a VOI LUT Sequence
first, else Window Center/Width, else the full range of the values) -> MONOCHROME1
inverted -> scaled to [0, 1] by the VOI output range (which follows Bits Stored).
Colour images (RGB, YBR_*, PALETTE COLOR) become luminance. A multi-frame object is
scored on its first frame; the ``frames`` column says how many it holds.

No patient identifiers leave this module: only the non-identifying attributes below
become columns, and Study/Series/Instance UIDs only as keyed-hash pseudonyms (HMAC-SHA256
with the site's key; without a key, no UIDs at all). Error text from pydicom is scrubbed
of the identifying values the dataset holds.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import warnings

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, pixel_array

# Attributes that may go into the output: useful, and not identifying.
COLUMNS = {
    "modality": "Modality",
    "view_position": "ViewPosition",
    "body_part": "BodyPartExamined",
    "photometric": "PhotometricInterpretation",
}
PSEUDONYMS = {
    "study_pseudonym": "StudyInstanceUID",
    "series_pseudonym": "SeriesInstanceUID",
    "instance_pseudonym": "SOPInstanceUID",
}
# Identifying attributes of DICOM PS3.15's basic confidentiality profile whose values
# are scrubbed from any error text (the profile's full list is longer; these carry text).
IDENTIFYING = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientSex",
    "PatientAge",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "OtherPatientIDs",
    "OtherPatientNames",
    "PatientMotherBirthName",
    "MilitaryRank",
    "EthnicGroup",
    "AccessionNumber",
    "StudyID",
    "InstitutionName",
    "InstitutionAddress",
    "ReferringPhysicianName",
    "PerformingPhysicianName",
    "OperatorsName",
    "PhysiciansOfRecord",
    "StationName",
    "DeviceSerialNumber",
    "StudyDate",
    "StudyTime",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "FrameOfReferenceUID",
)


class DicomError(Exception):
    """Why a DICOM object cannot be scored (one line, no identifying values)."""


def parse(data: bytes) -> Dataset:
    """Parse DICOM bytes, with or without the 128-byte preamble and DICM prefix."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # malformed-but-readable values: not the job's concern
        try:
            return pydicom.dcmread(io.BytesIO(data), force=True)
        except Exception as exc:
            raise DicomError(f"cannot parse DICOM ({type(exc).__name__})") from None


def looks_like_dicom(data: bytes) -> bool:
    """A dataset without a preamble: parses and holds attributes every image object has."""
    try:
        ds = parse(data)
    except DicomError:
        return False
    return any(tag in ds for tag in ("SOPClassUID", "PixelData", "Rows"))


def scrub(text: str, ds: Dataset) -> str:
    for keyword in IDENTIFYING:
        value = str(ds.get(keyword, "") or "")
        if len(value) >= 2:
            text = text.replace(value, "[removed]")
    return text


def pseudonym(uid: str, key: bytes) -> str:
    return hmac.new(key, uid.encode(), hashlib.sha256).hexdigest()[:32]


def attributes(ds: Dataset, key: bytes | None) -> dict:
    """The columns a DICOM input contributes to its output row."""
    meta = getattr(ds, "file_meta", None)
    out = {name: str(ds.get(keyword, "") or "") for name, keyword in COLUMNS.items()}
    out["transfer_syntax"] = str(meta.get("TransferSyntaxUID", "") if meta else "")
    out["rows"] = int(ds.get("Rows", 0) or 0)
    out["columns"] = int(ds.get("Columns", 0) or 0)
    out["frames"] = _frames(ds)
    for name, keyword in PSEUDONYMS.items():
        uid = str(ds.get(keyword, "") or "")
        out[name] = pseudonym(uid, key) if key and uid else ""
    return out


def _frames(ds: Dataset) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def to_unit_gray(ds: Dataset, *, max_pixels: int, modalities: tuple[str, ...] | None):
    """The first frame as float32 (rows, columns) in [0, 1], bone bright."""
    modality = str(ds.get("Modality", "") or "")
    if not any(t in ds for t in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        sop = getattr(ds.get("SOPClassUID"), "name", "") or "unknown SOP class"
        raise DicomError(f"DICOM object has no pixel data (Modality {modality or '?'}, {sop})")
    if modalities and modality not in modalities:
        raise DicomError(
            f"Modality {modality or '(none)'} is not one this model accepts "
            f"({', '.join(modalities)})"
        )
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if rows <= 0 or cols <= 0:
        raise DicomError("DICOM image has no Rows/Columns")
    if rows * cols > max_pixels:
        raise DicomError(
            f"{cols}x{rows} pixels exceeds the limit of {max_pixels:,}"
            " (possible decompression bomb)"
        )
    frames = _frames(ds)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr = pixel_array(ds, index=0 if frames > 1 else None)
            photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
            if photometric == "PALETTE COLOR":
                arr = apply_color_lut(arr, ds)
            if arr.ndim == 3:
                return _luminance(arr, ds)
            values = apply_modality_lut(arr, ds)
            if "VOILUTSequence" in ds or "WindowCenter" in ds:
                if "VOILUTSequence" in ds:
                    # A VOI LUT is indexed by integers; its output spans 2**bits values.
                    shown = apply_voi_lut(np.rint(values).astype(np.int64), ds, index=0)
                    lo, hi = 0.0, float(2 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1)
                else:
                    shown = apply_voi_lut(values.astype(np.float64), ds, index=0)
                    # The window's output range: what the same transform gives the extremes.
                    extremes = apply_voi_lut(np.array([-1e12, 1e12]), ds, index=0)
                    lo, hi = sorted(extremes.astype(float).tolist())
            else:
                shown = values.astype(np.float64)
                lo, hi = float(shown.min()), float(shown.max())
    except DicomError:
        raise
    except Exception as exc:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", "") or "unknown transfer syntax"
        raise DicomError(
            scrub(f"cannot decode DICOM pixel data ({name}): {_one_line(exc)}", ds)
        ) from None
    unit = np.clip((shown - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(shown)
    if photometric == "MONOCHROME1":
        unit = 1.0 - unit  # MONOCHROME1 shows low values bright: make bone bright always
    return unit.astype(np.float32)


def _luminance(rgb: np.ndarray, ds: Dataset) -> np.ndarray:
    bits = int(ds.get("BitsStored", 8) or 8)
    if ds.get("PhotometricInterpretation") == "PALETTE COLOR":
        bits = 16 if rgb.dtype == np.uint16 else 8  # palette LUT entries' own depth
    scale = float(2**bits - 1)
    gray = rgb[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return np.clip(gray / scale, 0, 1)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200] or type(exc).__name__
