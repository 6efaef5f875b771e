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
import struct
import warnings
import zlib

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, pixel_array
from pydicom.uid import DeflatedExplicitVRLittleEndian

from meddx import one_line

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


# pydicom inflates a deflated dataset whole, in memory. The dataset is mostly pixel data
# (60 Mpx of 16-bit is 120 MB), so anything inflating past this is a decompression bomb.
MAX_INFLATED_BYTES = 512 * 2**20
# Start-of-frame markers of JPEG (baseline to lossless, arithmetic too) and JPEG-LS (SOF55).
JPEG_SOF = {*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC), *range(0xCD, 0xD0), 0xF7}


class DicomError(Exception):
    """Why a DICOM object cannot be scored (one line, no identifying values)."""


def parse(data: bytes) -> Dataset:
    """Parse DICOM bytes, with or without the 128-byte preamble and DICM prefix."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # malformed-but-readable values: not the job's concern
        try:
            check_inflated_size(data)
            return pydicom.dcmread(io.BytesIO(data), force=True)
        except DicomError:
            raise
        except Exception as exc:
            raise DicomError(f"cannot parse DICOM ({type(exc).__name__})") from None


def check_inflated_size(data: bytes) -> None:
    """Refuse a deflated dataset that inflates past MAX_INFLATED_BYTES, counting in 1 MiB
    steps without keeping them (pydicom would inflate it whole)."""
    if DeflatedExplicitVRLittleEndian.encode() not in data[:4096]:  # the file meta's UID
        return
    fp = io.BytesIO(data)
    read_preamble(fp, True)
    # pydicom's own reader of the file meta group (read_file_meta_info wants a path).
    if _read_file_meta_info(fp).get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
        return
    inflater, pending, total = zlib.decompressobj(-zlib.MAX_WBITS), data[fp.tell() :], 0
    while pending and not inflater.eof:
        total += len(inflater.decompress(pending, 2**20))
        pending = inflater.unconsumed_tail
        if total > MAX_INFLATED_BYTES:
            raise DicomError(
                f"deflated DICOM inflates past {MAX_INFLATED_BYTES:,} bytes"
                " (possible decompression bomb)"
            )


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


def pseudonymous_id(row: dict) -> str:
    """How reports and file names name a study: its study (or instance) pseudonym, else
    a short hash of its URI (file names can hold patient names)."""
    return (
        row.get("study_pseudonym")
        or row.get("instance_pseudonym")
        or "u-" + hashlib.sha256(row["image_uri"].encode()).hexdigest()[:12]
    )


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
    check_codestream_size(ds, max_pixels)
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
            scrub(f"cannot decode DICOM pixel data ({name}): {one_line(exc)}", ds)
        ) from None
    unit = np.clip((shown - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(shown)
    if photometric == "MONOCHROME1":
        unit = 1.0 - unit  # MONOCHROME1 shows low values bright: make bone bright always
    return unit.astype(np.float32)


def check_codestream_size(ds: Dataset, max_pixels: int) -> None:
    """A compressed frame's decoder allocates what the codestream's own header declares,
    whatever Rows/Columns say: refuse a bomb before any decoder sees it."""
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if not (syntax and syntax.is_encapsulated and "PixelData" in ds):
        return
    try:
        frame = next(generate_frames(ds.PixelData, number_of_frames=_frames(ds)))
    except Exception:
        return  # no frame to find: the decoder reports it
    size = codestream_size(frame)
    if size and size[0] * size[1] > max_pixels:
        raise DicomError(
            f"compressed frame declares {size[0]}x{size[1]} pixels, over the limit of "
            f"{max_pixels:,} (possible decompression bomb)"
        )


def codestream_size(frame: bytes) -> tuple[int, int] | None:
    """(width, height) a JPEG, JPEG-LS or JPEG 2000 codestream declares, or None."""
    j2k = frame.find(b"\xff\x4f\xff\x51", 0, 4096)  # SOC then SIZ
    if j2k >= 0 and len(frame) >= j2k + 24:
        xsiz, ysiz, x0, y0 = struct.unpack(">IIII", frame[j2k + 8 : j2k + 24])
        return xsiz - x0, ysiz - y0
    if not frame.startswith(b"\xff\xd8"):  # SOI
        return None
    i = 2
    while i + 9 <= len(frame) and frame[i] == 0xFF:
        marker = frame[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker in JPEG_SOF:
            height, width = struct.unpack(">HH", frame[i + 5 : i + 9])
            return width, height
        elif 0xD0 <= marker <= 0xD9 or marker == 0x01:  # markers without a length
            i += 2
        else:
            i += 2 + struct.unpack(">H", frame[i + 2 : i + 4])[0]
    return None


def _luminance(rgb: np.ndarray, ds: Dataset) -> np.ndarray:
    bits = int(ds.get("BitsStored", 8) or 8)
    if ds.get("PhotometricInterpretation") == "PALETTE COLOR":
        bits = 16 if rgb.dtype == np.uint16 else 8  # palette LUT entries' own depth
    scale = float(2**bits - 1)
    gray = rgb[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return np.clip(gray / scale, 0, 1)
