"""Hostile inputs: small on disk, huge when decoded or unpacked.

Compressed zeros are built without compressing gigabytes: one MiB of zeros deflated and
flushed (a full flush resets the dictionary), then repeated. Streams are left without
their trailer: a reader that does its job stops long before the end.
"""

from __future__ import annotations

import io
import struct
import tarfile
import zlib

import pydicom

from .images import dicom_cr, jpeg, png

MIB = 2**20


def member(name: str, **attrs) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    for key, value in attrs.items():
        setattr(info, key, value)
    return info


def _zero_chunk() -> bytes:
    raw = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return raw.compress(bytes(MIB)) + raw.flush(zlib.Z_FULL_FLUSH)


def gzip_then_zeros(prefix: bytes, zero_mib: int) -> bytes:
    """A gzip stream: ``prefix``, then ``zero_mib`` MiB of zeros (about 1 KB each)."""
    head = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    return head.compress(prefix) + head.flush(zlib.Z_FULL_FLUSH) + _zero_chunk() * zero_mib


def gzip_tar_bomb(name: str = "bomb.png", mib: int = 2048) -> bytes:
    """A .tar.gz whose one member declares and holds ``mib`` MiB of zeros."""
    return gzip_then_zeros(member(name, size=mib * MIB).tobuf(), mib)


def pax_header_bomb(mib: int = 1024) -> bytes:
    """A .tar.gz that opens with a pax extended header of ``mib`` MiB (tarfile reads a
    pax header's data whole, in memory)."""
    header = member("././@PaxHeader", type=tarfile.XHDTYPE, size=mib * MIB)
    return gzip_then_zeros(header.tobuf(format=tarfile.USTAR_FORMAT), mib)


def members_tar(n: int) -> bytes:
    """An uncompressed tar of ``n`` empty image members."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(n):
            tar.addfile(tarfile.TarInfo(f"{i:06d}.png"))
    return buf.getvalue()


def links_tar() -> bytes:
    """Names that would escape an extraction folder, and every kind of non-file member."""
    buf = io.BytesIO()
    image = png("L", size=40)
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name in ("ok.png", "../../escape.png", "/abs/evil.png"):
            tar.addfile(member(name, size=len(image)), io.BytesIO(image))
        specials = [
            ("sym.png", tarfile.SYMTYPE, "/etc/passwd"),
            ("hard.png", tarfile.LNKTYPE, "ok.png"),
            ("dev.png", tarfile.CHRTYPE, ""),
            ("fifo.png", tarfile.FIFOTYPE, ""),
        ]
        for name, kind, target in specials:
            tar.addfile(member(name, type=kind, linkname=target))
    return buf.getvalue()


def jpeg_bomb(width: int = 65000, height: int = 65000) -> bytes:
    """A small JPEG whose frame header (SOF) declares ``width`` x ``height``."""
    return _patch_sof(jpeg(size=64), width, height)


def _patch_sof(data: bytes, width: int, height: int) -> bytes:
    out, i = bytearray(data), 2
    while out[i + 1] not in (0xC0, 0xC1, 0xC2, 0xC3):
        i += 2 + struct.unpack(">H", out[i + 2 : i + 4])[0]
    out[i + 5 : i + 9] = struct.pack(">HH", height, width)
    return bytes(out)


def dicom_huge_rows() -> bytes:
    """A CR whose Rows/Columns say 65535 x 65535 over a few bytes of pixel data."""
    ds = pydicom.dcmread(io.BytesIO(dicom_cr()))
    ds.Rows = ds.Columns = 65535
    return _save(ds)


def dicom_jpeg_frame_bomb() -> bytes:
    """A JPEG-compressed CR: Rows/Columns small, its frame's header 65000 x 65000."""
    from pydicom.encaps import encapsulate, generate_frames

    ds = pydicom.dcmread(pydicom.data.get_testdata_file("SC_rgb_jpeg_dcmtk.dcm"))
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([_patch_sof(frame, 65000, 65000)])
    ds.Modality = "CR"
    return _save(ds)


def deflated_dicom_bomb(mib: int = 1024, padding: int = 0) -> bytes:
    """A Deflated Explicit VR Little Endian file whose dataset inflates to ``mib`` MiB.
    With ``padding``, its file meta's first element is padded so the transfer syntax UID
    sits past the first ``padding`` bytes (a search of a prefix misses it)."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.filewriter import write_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    if padding:
        meta.FileMetaInformationVersion = b"\x00\x01" + bytes(padding)
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    buf = io.BytesIO()
    buf.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(buf, meta, enforce_standard=True)
    head = buf.getvalue()
    assert head.find(DeflatedExplicitVRLittleEndian.encode()) > padding
    return head + _zero_chunk() * mib + b"\x03\x00"  # then a final empty block


def sparse_pax_header_bomb(mib: int = 1024) -> bytes:
    """A .tar.gz: a member whose pax header says GNU.sparse.size=10**12 (its logical size,
    not what the archive holds), then a pax header of ``mib`` MiB."""
    image = png("L", size=40)
    first = member("a.png", size=len(image))
    first.pax_headers = {"GNU.sparse.size": str(10**12)}
    prefix = first.tobuf(format=tarfile.PAX_FORMAT) + image + bytes(-len(image) % 512)
    header = member("././@PaxHeader", type=tarfile.XHDTYPE, size=mib * MIB)
    return gzip_then_zeros(prefix + header.tobuf(format=tarfile.USTAR_FORMAT), mib)


def _box(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", 8 + len(payload)) + kind + payload


def boxed_jp2_dicom_bomb(width: int = 65000, height: int = 65000, padding: int = 8192) -> bytes:
    """A JPEG 2000 CR whose frame is a whole JP2 file: signature, file type, a ``free``
    box of ``padding`` bytes, then the codestream box, its SIZ saying width x height."""
    import numpy as np
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEG2000Lossless

    codestream = bytearray(jpeg2k_codestream(np.zeros((64, 64), np.uint16)))
    codestream[8:16] = struct.pack(">II", width, height)  # Xsiz, Ysiz (offsets are 0)
    jp2 = (
        _box(b"jP  ", b"\r\n\x87\n")  # the JP2 signature box
        + _box(b"ftyp", b"jp2 \0\0\0\0jp2 ")
        + _box(b"free", bytes(padding))
        + _box(b"jp2c", bytes(codestream))
    )
    ds = pydicom.dcmread(io.BytesIO(dicom_cr()))
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = encapsulate([jp2])
    ds["PixelData"].VR = "OB"
    return _save(ds)


def jpeg2k_codestream(pixels) -> bytes:
    """A bare JPEG 2000 codestream (J2K, lossless) of ``pixels``."""
    import imagecodecs

    return imagecodecs.jpeg2k_encode(pixels, level=0, codecformat=imagecodecs.JPEG2K.CODEC.J2K)


def _save(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


# ---- malformed attributes ---------------------------------------------------------------
#
# A real CR (tests/images.py) with one attribute broken as broken writers and hostile
# files break them: several values where one belongs, the wrong VR (text in Rows), empty,
# negative, absurd, or text that is no code string. Each must be one error row whose
# reason names the attribute and holds none of the file's values (PROBE is in every
# file's PatientName, and in the broken value where text can carry it).
PROBE = "Probe^Leak^7731"


def _cr_with(change) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(dicom_cr(patient_name=PROBE)))
    change(ds)
    return _save(ds)


def _lut_item(descriptor, data=True):
    from pydicom.dataset import Dataset

    item = Dataset()
    item.LUTDescriptor = descriptor
    if data:
        item.LUTData = bytes(range(32))  # 16 entries of 16 bits (OW)
    item.ModalityLUTType = "HU"
    return item


def malformed_dicoms() -> dict[str, tuple[bytes, str]]:
    """name -> (DICOM bytes, the reason its row must give)."""
    from pydicom.dataelem import DataElement
    from pydicom.sequence import Sequence

    def setting(keyword, value):
        return lambda ds: setattr(ds, keyword, value)

    def typed(keyword, vr, value):  # with a VR of its own: text in Rows, say
        tag = pydicom.datadict.tag_for_keyword(keyword)
        return lambda ds: ds.__setitem__(tag, DataElement(tag, vr, value))

    def lut(descriptor, data=True):
        return Sequence([_lut_item(descriptor, data)])

    cases = {
        "rows-two-values": (setting("Rows", [64, 64]), "Rows holds 2 values where one is expected"),
        "rows-text": (typed("Rows", "LO", PROBE), "Rows is not an integer"),
        "columns-negative": (typed("Columns", "SS", -64), "Columns is out of range (0 to 65535)"),
        "bits-stored-absurd": (setting("BitsStored", 40), "BitsStored is out of range (1 to 16)"),
        "bits-allocated-missing": (
            lambda ds: delattr(ds, "BitsAllocated"),
            "BitsAllocated is missing",
        ),
        "samples-absurd": (
            setting("SamplesPerPixel", 7),
            "SamplesPerPixel is out of range (1 to 3)",
        ),
        "frames-negative": (setting("NumberOfFrames", "-3"), "NumberOfFrames is out of range"),
        "photometric-unknown": (
            setting("PhotometricInterpretation", "GREEN"),
            "PhotometricInterpretation is not one meddx reads",
        ),
        "photometric-name": (
            setting("PhotometricInterpretation", PROBE),
            "PhotometricInterpretation is not a DICOM code string",
        ),
        "modality-two-values": (
            setting("Modality", ["CR", "DX"]),
            "Modality holds 2 values where one is expected",
        ),
        "view-formula": (
            setting("ViewPosition", '=HYPERLINK("http://x","PA")'),
            "ViewPosition is not a DICOM code string",
        ),
        "body-part-name": (
            setting("BodyPartExamined", PROBE),
            "BodyPartExamined is not a DICOM code string",
        ),
        "window-width-zero": (setting("WindowWidth", 0), "WindowWidth is not positive"),
        "window-center-text": (typed("WindowCenter", "LO", PROBE), "WindowCenter is not a number"),
        "window-center-infinite": (
            setting("WindowCenter", "1e999"),
            "WindowCenter is not a finite number",
        ),
        "rescale-two-slopes": (
            setting("RescaleSlope", [1, 2]),
            "RescaleSlope holds several values where one is expected",
        ),
        "voi-lut-empty": (setting("VOILUTSequence", Sequence([])), "VOILUTSequence holds no item"),
        "voi-lut-bits-absurd": (
            setting("VOILUTSequence", lut([16, 0, 60])),
            "VOILUTSequence's LUTDescriptor is out of range",
        ),
        "modality-lut-without-data": (
            setting("ModalityLUTSequence", lut([16, 0, 12], data=False)),
            "ModalityLUTSequence has no LUTData",
        ),
        "study-uid-name": (setting("StudyInstanceUID", PROBE), "StudyInstanceUID is not a UID"),
        "series-uid-two-values": (
            setting("SeriesInstanceUID", ["1.2.3", "1.2.4"]),
            "SeriesInstanceUID holds 2 values where one is expected",
        ),
    }
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns of the very values made here
        return {name: (_cr_with(change), reason) for name, (change, reason) in cases.items()}
