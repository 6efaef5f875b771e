"""Tar shards in the WebDataset layout, streamed with limits on what one may cost.

An object whose name ends in ``.tar`` (``.tar.gz``, ``.tgz``; gzip, bzip2 or xz, as its
magic bytes say) is a shard: each image member gives one row, ``image_uri =
SHARD#MEMBER``. A shard is streamed, never extracted: member names are only ever
strings, links and devices are error rows, and a hostile shard (a decompression bomb,
huge headers, millions of members) is refused where it starts to cost too much.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import tarfile
import zlib
from collections.abc import Iterator

from meddx import one_line
from meddx.inputs import storage
from meddx.inputs.storage import MEMBER_SEPARATOR, StorageSettings
from meddx.names import DEFAULT_MAX_OBJECT_BYTES

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
# Tar members that are images; companions (.json, .cls, .txt) are metadata, not inputs.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")
# WebDataset shards hold hundreds to a few thousand samples, and tarfile keeps a header
# object per member, so a shard of millions of empty members would fill memory.
MAX_SHARD_MEMBERS = 100_000
# gzip'd images inflate about 1:1 and raw DICOM about 3:1; a decompression bomb 1000:1.
# (Apache POI refuses zip entries past the same 100:1.)
MAX_INFLATE_RATIO = 100
# pax and GNU long-name headers hold a name and a few attributes; tarfile reads their data
# into memory whole, so a header claiming more is refused.
MAX_HEADER_BYTES = 2**20
# tarfile reads a stream in steps of this size (and skips members the same way): 1 MiB
# steps keep Python's overhead small next to the inflating.
TAR_READ_BYTES = 2**20


def is_shard(uri: str) -> bool:
    """Whether ``uri`` is a tar shard or one of its members."""
    return storage.shard_of(uri).lower().endswith(SHARD_SUFFIXES)


class ShardRefused(Exception):
    """A tar shard that would cost more than the limits allow (the reason, one line)."""


class GuardedStream:
    """A shard's tar bytes (inflated here when compressed), counted as tarfile reads them.

    Refuses to inflate past ``inflate_limit`` and to read more than MAX_HEADER_BYTES of
    header data between one member's data and the next member.
    """

    def __init__(self, raw, inflate_limit: int | None):
        self._raw = raw
        self.inflate_limit = inflate_limit
        self.pos = 0
        self.header_end = MAX_HEADER_BYTES + TAR_READ_BYTES

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self.pos += len(data)
        if self.inflate_limit is not None and self.pos > self.inflate_limit:
            raise ShardRefused(
                f"compressed tar shard inflates past {self.inflate_limit:,} bytes "
                "(possible decompression bomb)"
            )
        if self.pos > self.header_end:  # reads run ahead of tarfile by one step at most
            raise ShardRefused(f"tar header data over {MAX_HEADER_BYTES:,} bytes")
        return data

    def entered(self, next_header: int) -> None:
        """The next header starts at ``next_header``: tarfile's own offset in the stream,
        which it skips to. A member's ``size`` is not that: a pax GNU.sparse.size or
        realsize sets it to the logical size, which may be anything."""
        self.header_end = next_header + MAX_HEADER_BYTES + TAR_READ_BYTES


def open_tar_stream(fh, compressed_size: int, max_bytes: int) -> GuardedStream:
    """The tar bytes of an open shard, inflated by the codec its magic bytes name."""
    magic = fh.read(6)
    fh.seek(0)
    if magic.startswith(b"\x1f\x8b"):
        inflated = gzip.GzipFile(fileobj=fh)
    elif magic.startswith(b"BZh"):
        inflated = bz2.BZ2File(fh)
    elif magic.startswith(b"\xfd7zXZ\x00"):
        inflated = lzma.LZMAFile(fh)
    else:
        return GuardedStream(fh, None)
    # One member at the object limit may be stored compressed; past that, the ratio.
    return GuardedStream(inflated, max(MAX_INFLATE_RATIO * compressed_size, max_bytes))


def read_shard(
    uri: str, settings: StorageSettings, max_bytes: int = DEFAULT_MAX_OBJECT_BYTES
) -> Iterator[tuple[str, bytes, str]]:
    """(member_uri, bytes, error) for each image member of a tar shard, streamed.

    A corrupt member is the decoder's to reject; a truncated, unreadable or refused shard
    gives an error row (for the member it broke in, or the shard itself). Nothing is
    extracted: links and devices are error rows, names are only strings.
    """
    fs = storage.filesystem(uri, settings)
    current, images, members = uri, 0, 0
    try:
        with fs.open(storage.strip_scheme(uri), "rb") as fh:
            size = getattr(fh, "size", None) or fs.size(storage.strip_scheme(uri))
            stream = open_tar_stream(fh, size, max_bytes)
            with tarfile.open(fileobj=stream, mode="r|", bufsize=TAR_READ_BYTES) as tar:
                while (member := tar.next()) is not None:
                    tar.members.clear()  # kept for random access, which a stream never needs
                    stream.entered(tar.offset)
                    members += 1
                    if members > MAX_SHARD_MEMBERS:
                        raise ShardRefused(f"tar shard holds over {MAX_SHARD_MEMBERS:,} members")
                    name = member.name
                    if member.isdir() or storage.is_hidden(name):
                        continue
                    if not name.lower().endswith(IMAGE_SUFFIXES):
                        continue
                    current = f"{uri}{MEMBER_SEPARATOR}{name}"
                    images += 1
                    if not member.isfile():
                        yield current, b"", "tar member is a link or device, not a file"
                    elif member.size > max_bytes:
                        yield (
                            current,
                            b"",
                            f"tar member of {member.size:,} bytes is over the limit of "
                            f"{max_bytes:,} (--max-object-bytes)",
                        )
                    else:
                        yield current, tar.extractfile(member).read(), ""
                    current = uri
        if images == 0:  # still one row: the shard is accounted for
            yield uri, b"", "tar shard holds no image members"
    except FileNotFoundError:
        yield uri, b"", "object not found"
    except PermissionError:
        yield uri, b"", "access denied"
    except ShardRefused as exc:
        yield current, b"", f"{exc}: refused the rest of {uri}"
    except (tarfile.TarError, EOFError, OSError, ValueError, zlib.error, lzma.LZMAError) as exc:
        yield current, b"", f"unreadable or truncated tar shard {uri}: {one_line(exc)}"
    except Exception as exc:  # never a crashed block: whatever else, the shard is a row
        yield current, b"", f"read failed for tar shard {uri}: {one_line(exc)}"
