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


def deflated_dicom_bomb(mib: int = 1024) -> bytes:
    """A Deflated Explicit VR Little Endian file whose dataset inflates to ``mib`` MiB."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.filewriter import write_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    buf = io.BytesIO()
    buf.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(buf, meta, enforce_standard=True)
    return buf.getvalue() + _zero_chunk() * mib + b"\x03\x00"  # then a final empty block


def _save(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
