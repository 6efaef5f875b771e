"""A DICOM object's first frame as stored values, decoded no larger than needed.

Uncompressed little-endian grayscale is a view on the pixel data; other syntaxes go to
the fastest installed decoder. JPEG 2000 and HTJ2K drop wavelet levels and JPEG
baseline scales its DCT to reach the resolution the model needs; anything else is
decoded whole and box-reduced. A compressed frame's own header is read before any
decoder sees it, so a frame declaring more pixels than allowed is refused unread.
Stored values only: the LUTs and the photometric interpretation are ``dicom.py``'s.
"""

from __future__ import annotations

import importlib.util
import io
import struct
from dataclasses import dataclass

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames, get_frame
from pydicom.pixels import pixel_array
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
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

from meddx.imaging.attributes import DicomError
from meddx.imaging.attributes import frames as frames_of


def first_frame(ds: Dataset) -> np.ndarray:
    """The first frame's stored values at full size, by the fastest installed decoder.

    Uncompressed little-endian grayscale is a view on the pixel data (no copy); an
    encapsulated multi-frame object decodes only its first frame's fragments."""
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    frames = frames_of(ds)
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


def reduced_codestream(ds: Dataset, target: int) -> np.ndarray | None:
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
    return get_frame(ds.PixelData, 0, number_of_frames=frames_of(ds))


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
        frame = next(generate_frames(ds.PixelData, number_of_frames=frames_of(ds)))
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


# Start-of-frame markers of JPEG (baseline to lossless, arithmetic too) and JPEG-LS (SOF55).
JPEG_SOF = {*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC), *range(0xCD, 0xD0), 0xF7}


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
