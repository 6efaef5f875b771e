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

import contextlib
import hashlib
import hmac
import importlib.util
import io
import logging
import struct
import warnings
import zlib
from dataclasses import dataclass

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames, get_frame
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, pixel_array
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from meddx import one_line
from meddx.imaging.attributes import (  # dicom.DicomError and the readers
    DicomError,
    Geometry,
    check_luts,
    code,
    decimals,
    geometry,
    integer,
    single,
    uid,
    values,
)
from meddx.imaging.attributes import frames as _frames

__all__ = ["DicomError", "Geometry", "code", "decimals", "integer", "single", "uid", "values"]

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
    out["frames"] = _frames(ds)
    for name, keyword in PSEUDONYMS.items():
        value = uid(ds, keyword) if key else ""
        out[name] = pseudonym(value, key) if key and value else ""
    return out


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
    if modalities and modality not in modalities:
        raise DicomError(
            f"Modality {modality or '(none)'} is not one this model accepts "
            f"({', '.join(modalities)})"
        )
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
            stored = _reduced_codestream(ds, target) if target else None
            extremes = None
            if stored is None:
                arr = _first_frame(ds)
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


def _first_frame(ds: Dataset) -> np.ndarray:
    """The first frame's stored values at full size, by the fastest installed decoder.

    Uncompressed little-endian grayscale is a view on the pixel data (no copy); an
    encapsulated multi-frame object decodes only its first frame's fragments."""
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    frames = _frames(ds)
    native = _native_view(ds, syntax)
    if native is not None:
        return native
    plugin = FASTEST_DECODER.get(str(syntax), "")
    if plugin and not _has_plugin(plugin):
        plugin = ""
    return pixel_array(ds, index=0 if frames > 1 else None, decoding_plugin=plugin)


# pydicom's decoders differ tenfold in speed (2,800 x 2,400, one core): RLE 14 ms with
# pylibjpeg-rle against 128 ms with pydicom's numpy decoder; JPEG-LS 158 ms with pyjpegls
# (CharLS) against 571 ms with pylibjpeg-libjpeg.
FASTEST_DECODER = {
    RLELossless: "pylibjpeg",
    JPEGLSLossless: "pyjpegls",
    JPEGLSNearLossless: "pyjpegls",
}
_PLUGIN_MODULES = {"pylibjpeg": "rle", "pyjpegls": "jpeg_ls"}


def _has_plugin(plugin: str) -> bool:
    return importlib.util.find_spec(_PLUGIN_MODULES[plugin]) is not None


def _native_view(ds: Dataset, syntax) -> np.ndarray | None:
    """The first frame of uncompressed little-endian grayscale as a view, else None."""
    if syntax not in (ExplicitVRLittleEndian, ImplicitVRLittleEndian) or "PixelData" not in ds:
        return None
    bits = int(ds.get("BitsAllocated", 0) or 0)
    if bits not in (8, 16) or int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        return None
    stored = int(ds.get("BitsStored", bits) or bits)
    if stored != bits and int(ds.get("PixelRepresentation", 0) or 0):
        return None  # signed values narrower than their container: pydicom sign-extends
    rows, cols = int(ds.Rows), int(ds.Columns)
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    dtype = np.dtype(f"<{'i' if signed else 'u'}{bits // 8}")
    if len(ds.PixelData) < rows * cols * dtype.itemsize:
        return None  # short pixel data: pydicom says why
    arr = np.frombuffer(ds.PixelData, dtype=dtype, count=rows * cols).reshape(rows, cols)
    if stored < bits and int(arr.max()) >= 2**stored:
        arr = arr & np.array(2**stored - 1, dtype)  # bits above Bits Stored are not pixel
    return arr


def box_reduce(arr: np.ndarray, target: int) -> np.ndarray:
    """Mean of k x k blocks, k the largest integer keeping the short side >= ``target``;
    a ragged last row or column of blocks is the mean of what it holds (nothing dropped,
    so the film's geometry is kept).

    Rows are summed first on the contiguous array, so the only temporaries are 1/k of
    the film; the result is float32 (means of stored values)."""
    k = min(arr.shape[0], arr.shape[1]) // target
    if k <= 1:
        return arr
    acc = np.uint32 if arr.dtype.kind == "u" and arr.itemsize <= 2 else np.float64
    rows = _block_means(arr, k, acc)  # float32 now: the columns sum as floats
    return _block_means(rows, k, np.float64, axis=1).astype(np.float32)


def _block_means(arr: np.ndarray, k: int, acc, axis: int = 0) -> np.ndarray:
    """Means of runs of k along ``axis`` (0 or 1); the last run may be shorter."""
    n = arr.shape[axis]
    whole = n // k * k
    head = arr[:whole] if axis == 0 else arr[:, :whole]
    shape = (n // k, k, *arr.shape[1:]) if axis == 0 else (arr.shape[0], n // k, k, *arr.shape[2:])
    means = head.reshape(shape).sum(axis=axis + 1, dtype=acc) / np.float32(k)
    if whole == n:
        return means
    tail = arr[whole:] if axis == 0 else arr[:, whole:]
    rest = tail.sum(axis=axis, dtype=acc, keepdims=True) / np.float32(n - whole)
    return np.concatenate([means, rest.astype(means.dtype)], axis=axis)


# Transfer syntaxes whose codec can decode a lower resolution directly.
J2K_SYNTAXES = {JPEG2000Lossless, JPEG2000, HTJ2KLossless, HTJ2KLosslessRPCL, HTJ2K}


def _reduced_codestream(ds: Dataset, target: int) -> np.ndarray | None:
    """Stored values of the first frame decoded at a reduced resolution (short side still
    >= ``target``), for one-sample unsigned JPEG 2000/HTJ2K and 8-bit JPEG baseline; None
    for anything else (decoded at full size instead)."""
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1 or int(ds.get("PixelRepresentation", 0) or 0):
        return None
    if syntax in J2K_SYNTAXES:
        return reduced_j2k(_first_fragment(ds), target)
    if syntax == JPEGBaseline8Bit:
        img = Image.open(io.BytesIO(_first_fragment(ds)), formats=["JPEG"])
        img.draft("L", (target, target))  # libjpeg scales the DCT by 1/2, 1/4 or 1/8
        return np.asarray(img.convert("L"))
    return None


def _first_fragment(ds: Dataset) -> bytes:
    return get_frame(ds.PixelData, 0, number_of_frames=_frames(ds))


def reduced_j2k(codestream: bytes, target: int) -> np.ndarray | None:
    """A one-component JPEG 2000 or HTJ2K codestream decoded with as many wavelet levels
    dropped as keep its short side >= ``target`` (OpenJPEG through Pillow); stored values
    as uint8/uint16. None when the codestream is not one this path reads."""
    header = j2k_header(codestream)
    if header is None or header.components != 1 or header.signed or header.precision > 16:
        return None
    reduce = 0
    while reduce < header.levels and -(-header.short_side // 2 ** (reduce + 1)) >= target:
        reduce += 1
    # Pillow sizes a reduced image by rounding, OpenJPEG by the ceiling: where they
    # differ (a 2,500 px side at 16x: 156 against 157) Pillow's decode fails with
    # "broken data stream". Drop one level fewer there.
    while reduce and not all(
        (side + (1 << reduce >> 1)) >> reduce == -(-side >> reduce)
        for side in (header.width, header.height)
    ):
        reduce -= 1
    img = Image.open(io.BytesIO(codestream), formats=["JPEG2000"])
    img.reduce = reduce
    img.load()
    arr = np.asarray(img)
    if img.mode in ("I;16", "I;16B", "I;16L") and header.precision < 16:
        arr = arr >> (16 - header.precision)  # Pillow scales samples up to 16 bits
    if reduce == 0:
        return arr
    # A low-pass sample of level r sits on the film's pixel 2**r * i, not at the centre of
    # the block of 2**r pixels a box reduction averages: resample it there (a shift just
    # under half a reduced pixel), so reduced and full decodes line up.
    shift = np.float32(0.5 - 0.5 / 2**reduce)
    out = arr.astype(np.float32)
    for axis in (0, 1):  # linear interpolation towards the next sample, edges repeated
        following = (
            np.concatenate([out[1:], out[-1:]])
            if axis == 0
            else np.concatenate([out[:, 1:], out[:, -1:]], axis=1)
        )
        out = (1 - shift) * out + shift * following
    return box_reduce(out, target)


@dataclass(frozen=True)
class J2KHeader:
    width: int
    height: int
    components: int
    precision: int
    signed: bool
    levels: int  # wavelet decomposition levels: resolutions that can be dropped

    @property
    def short_side(self) -> int:
        return min(self.width, self.height)


def j2k_header(codestream: bytes) -> J2KHeader | None:
    """SIZ and COD of a raw JPEG 2000 codestream (as DICOM encapsulates it), or None."""
    if not codestream.startswith(b"\xff\x4f\xff\x51") or len(codestream) < 42:
        return None
    xsiz, ysiz, x0, y0 = struct.unpack(">IIII", codestream[8:24])
    components = struct.unpack(">H", codestream[40:42])[0]
    if components < 1 or len(codestream) < 43:
        return None
    ssiz = codestream[42]
    cod = codestream.find(b"\xff\x52", 42, 4096)
    if cod < 0 or len(codestream) < cod + 10:
        return None
    return J2KHeader(
        width=xsiz - x0,
        height=ysiz - y0,
        components=components,
        precision=(ssiz & 0x7F) + 1,
        signed=bool(ssiz & 0x80),
        levels=codestream[cod + 9],
    )


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
    if size is None and syntax in J2K_SYNTAXES:
        raise DicomError("JPEG 2000 frame is neither a codestream nor a JP2 file")
    if size and size[0] * size[1] > max_pixels:
        raise DicomError(
            f"compressed frame declares {size[0]}x{size[1]} pixels, over the limit of "
            f"{max_pixels:,} (possible decompression bomb)"
        )


# A JP2 file's first box (ISO/IEC 15444-1 I.5.1): some writers encapsulate whole JP2
# files, not bare codestreams, and OpenJPEG decodes either.
JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"


def codestream_size(frame: bytes) -> tuple[int, int] | None:
    """(width, height) a JPEG, JPEG-LS or JPEG 2000 codestream declares, or None.

    A JP2-boxed frame is read at its contiguous codestream box (``jp2c``), wherever the
    boxes before it put it; a boxed frame without one declares an unknown size."""
    if frame.startswith(JP2_SIGNATURE):
        start = jp2_codestream(frame)
        if start is None:
            raise DicomError("JPEG 2000 frame is JP2-boxed without a codestream box")
        frame = frame[start:]
    if frame.startswith(b"\xff\x4f\xff\x51"):  # SOC then SIZ
        if len(frame) < 24:
            raise DicomError("JPEG 2000 codestream is cut off in its SIZ marker")
        xsiz, ysiz, x0, y0 = struct.unpack(">IIII", frame[8:24])
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


def jp2_codestream(data: bytes) -> int | None:
    """Where the ``jp2c`` box's codestream starts in a JP2 file, walking the top-level
    boxes (length 0: to the end; 1: a 64-bit length follows), or None."""
    pos = 0
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        header = 8
        if length == 1:
            if pos + 16 > len(data):
                return None
            length, header = struct.unpack(">Q", data[pos + 8 : pos + 16])[0], 16
        elif length == 0:
            length = len(data) - pos
        if kind == b"jp2c":
            return pos + header
        if length < header:
            return None
        pos += length
    return None


def _luminance(rgb: np.ndarray, ds: Dataset) -> np.ndarray:
    bits = int(ds.get("BitsStored", 8) or 8)
    if ds.get("PhotometricInterpretation") == "PALETTE COLOR":
        bits = 16 if rgb.dtype == np.uint16 else 8  # palette LUT entries' own depth
    scale = float(2**bits - 1)
    gray = rgb[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return np.clip(gray / scale, 0, 1)
