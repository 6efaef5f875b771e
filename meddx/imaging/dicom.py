"""DICOM -> grayscale in [0, 1] with bone bright, plus the attributes that may leave the job.

The order is the one pydicom documents for display: stored pixel data (at the resolution
needed, ``pixel_data.py``) -> modality LUT (Rescale Slope/Intercept or a Modality LUT
Sequence) -> VOI LUT (a VOI LUT Sequence first, else Window Center/Width, else the full
range of the values) -> MONOCHROME1 inverted -> scaled to [0, 1] by the VOI output range
(which follows Bits Stored).
Colour images (RGB, YBR_*, PALETTE COLOR) become luminance. A multi-frame object is
scored on its first frame; the ``frames`` column says how many it holds.

No patient identifiers leave this module: only the non-identifying attributes below
become columns, and Study/Series/Instance UIDs only as keyed-hash pseudonyms (HMAC-SHA256
with the site's key; without a key, no UIDs at all). Error text from pydicom is scrubbed
of the identifying values the dataset holds.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import io
import logging
import warnings
import zlib

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut
from pydicom.uid import DeflatedExplicitVRLittleEndian

from meddx import one_line
from meddx.imaging.attributes import DicomError, check_luts, code, decimals, geometry, integer, uid
from meddx.imaging.attributes import frames as frames_of
from meddx.imaging.pixel_data import (
    box_reduce,
    check_codestream_size,
    first_frame,
    reduced_codestream,
)

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


@contextlib.contextmanager
def silenced():
    """pydicom and its plugins warn, and log to the "pydicom" logger, with the offending
    values themselves ("Invalid value for VR DA: '19800101'"): warnings off and that
    logger's records dropped while a file's values are read (malformed-but-readable
    values are each reader's to refuse, by name, not pydicom's to print)."""
    logger = logging.getLogger("pydicom")
    before = logger.disabled
    logger.disabled = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.disabled = before


def parse(data: bytes) -> Dataset:
    """Parse DICOM bytes, with or without the 128-byte preamble and DICM prefix."""
    with silenced():
        try:
            check_inflated_size(data)
            ds = pydicom.dcmread(io.BytesIO(data), force=True)
        except DicomError:
            raise
        except Exception as exc:
            raise DicomError(f"cannot parse DICOM ({type(exc).__name__})") from None
    # pydicom gives up on a cut-off dataset (an encapsulated pixel data item without its
    # end) by warning and returning no elements at all: say what happened.
    if not len(ds):
        raise DicomError("DICOM dataset is truncated or empty: no element could be read")
    return ds


def check_inflated_size(data: bytes) -> None:
    """Refuse a deflated dataset that inflates past MAX_INFLATED_BYTES, counting in 1 MiB
    steps without keeping them (pydicom would inflate it whole).

    The transfer syntax is read from the file meta group as pydicom reads it, not looked
    for in the first bytes: earlier elements of any length can push it anywhere."""
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
    """The columns a DICOM input contributes to its output row, each checked (geometry
    absent stays 0: an object without pixel data is refused for that, later)."""
    meta = getattr(ds, "file_meta", None)
    out = {name: code(ds, keyword) for name, keyword in COLUMNS.items()}
    out["transfer_syntax"] = uid(meta, "TransferSyntaxUID") if meta is not None else ""
    out["rows"] = integer(ds, "Rows", 0, 0, 65535)
    out["columns"] = integer(ds, "Columns", 0, 0, 65535)
    out["frames"] = frames_of(ds)
    for name, keyword in PSEUDONYMS.items():
        value = uid(ds, keyword) if key else ""
        out[name] = pseudonym(value, key) if key and value else ""
    return out


def refused_modality(modality: str, modalities: tuple[str, ...] | None) -> str | None:
    """Why a DICOM object of ``modality`` is not scored (``modalities`` asked for), or
    None; its one line names only the attribute's code."""
    if modalities and modality not in modalities:
        return (
            f"Modality {modality or '(none)'} is not one this model accepts "
            f"({', '.join(modalities)})"
        )
    return None


def to_unit_gray(
    ds: Dataset, *, max_pixels: int, modalities: tuple[str, ...] | None, target: int | None = None
) -> np.ndarray:
    """The first frame as float32 in [0, 1], bone bright, with a short side of at least
    ``target`` (None: full size).

    Only the resolution the model needs is decoded where the codec allows it (JPEG 2000 and
    HTJ2K drop wavelet levels, JPEG baseline scales its DCT); other syntaxes are decoded at
    full size and box-reduced on their stored values. The modality LUT, VOI LUT and
    MONOCHROME1 inversion then run on the reduced array: no float copy of a full film.
    """
    modality = code(ds, "Modality")
    if not any(t in ds for t in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        sop = getattr(ds.get("SOPClassUID"), "name", "") or "unknown SOP class"
        raise DicomError(f"DICOM object has no pixel data (Modality {modality or '?'}, {sop})")
    refused = refused_modality(modality, modalities)
    if refused:
        raise DicomError(refused)
    if not integer(ds, "Rows", 0, 0, 65535) or not integer(ds, "Columns", 0, 0, 65535):
        raise DicomError("DICOM image has no Rows/Columns")
    shape = geometry(ds)
    rows, cols = shape.rows, shape.columns
    if rows * cols > max_pixels:
        raise DicomError(
            f"{cols}x{rows} pixels exceeds the limit of {max_pixels:,}"
            " (possible decompression bomb)"
        )
    check_codestream_size(ds, max_pixels)
    check_luts(ds)
    photometric = shape.photometric
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            stored = reduced_codestream(ds, target) if target else None
            extremes = None
            if stored is None:
                arr = first_frame(ds)
                if photometric == "PALETTE COLOR":
                    arr = apply_color_lut(arr, ds)
                if arr.ndim == 3:  # colour: rare for radiographs, reduced after luminance
                    gray = _luminance(arr, ds)
                    return box_reduce(gray, target) if target else gray
                # Without a VOI the window is the values' full range: taken at full size,
                # so reduced and full decodes share it.
                extremes = np.array([arr.min(), arr.max()])
                stored = box_reduce(arr, target) if target else arr
            unit = _display(stored, ds, extremes)
    except DicomError:
        raise
    except Exception as exc:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", "") or "unknown transfer syntax"
        raise DicomError(
            scrub(
                f"cannot decode DICOM pixel data ({name}): {type(exc).__name__}: {one_line(exc)}",
                ds,
            )
        ) from None
    if photometric == "MONOCHROME1":
        unit = 1.0 - unit  # MONOCHROME1 shows low values bright: make bone bright always
    return unit.astype(np.float32, copy=False)


def _display(stored: np.ndarray, ds: Dataset, extremes: np.ndarray | None) -> np.ndarray:
    """Stored values (any shape, integer or box means) -> [0, 1] through the modality LUT
    and the VOI LUT, scaled by the VOI output range. ``extremes``: the lowest and highest
    stored value of the whole frame, if known (the window when there is no VOI)."""
    if "ModalityLUTSequence" in ds:  # a table is indexed by integers
        stored = np.rint(stored).astype(np.int64)
        extremes = None if extremes is None else extremes.astype(np.int64)
    values = apply_modality_lut(stored, ds)
    if "VOILUTSequence" in ds:
        # A VOI LUT is indexed by integers; its output spans 2**bits values.
        shown = apply_voi_lut(np.rint(values).astype(np.int64), ds, index=0)
        lo, hi = 0.0, float(2 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1)
    elif decimals(ds, "WindowCenter"):
        shown = apply_voi_lut(values.astype(np.float64), ds, index=0)
        # The window's output range: what the same transform gives the extremes.
        extremes = apply_voi_lut(np.array([-1e12, 1e12]), ds, index=0)
        lo, hi = sorted(extremes.astype(float).tolist())
    else:
        shown = values.astype(np.float64)
        ends = shown if extremes is None else apply_modality_lut(extremes, ds)
        lo, hi = sorted([float(ends.min()), float(ends.max())])
    return np.clip((shown - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(shown)


def _luminance(rgb: np.ndarray, ds: Dataset) -> np.ndarray:
    bits = int(ds.get("BitsStored", 8) or 8)
    if ds.get("PhotometricInterpretation") == "PALETTE COLOR":
        bits = 16 if rgb.dtype == np.uint16 else 8  # palette LUT entries' own depth
    scale = float(2**bits - 1)
    gray = rgb[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return np.clip(gray / scale, 0, 1)
