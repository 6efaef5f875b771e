"""One place that turns a URI plus settings into a filesystem.

Every Ray read and write gets ``filesystem=`` from here explicitly: Ray workers are
separate processes and must not guess endpoints or credentials. S3 credentials come
from the standard AWS chain (environment, config files, instance role); they are never
passed through meddx objects, so they cannot leak into logs or outputs.
"""

from __future__ import annotations

import errno
import functools
import os
import posixpath
from dataclasses import dataclass

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from meddx import MeddxError

ENDPOINT_ENV = "MEDDX_S3_ENDPOINT"
CA_BUNDLE_ENV = "MEDDX_CA_BUNDLE"


@dataclass(frozen=True)
class StorageSettings:
    """How to reach object storage and DICOMweb servers. Only the endpoint and the CA
    bundle: credentials stay in the AWS chain and the environment (dicomweb.py)."""

    s3_endpoint: str | None = None
    ca_bundle: str | None = None  # PEM file of the site's CA, for DICOMweb over TLS

    @classmethod
    def from_env(cls, s3_endpoint: str | None = None) -> StorageSettings:
        return cls(
            s3_endpoint=s3_endpoint or os.environ.get(ENDPOINT_ENV) or None,
            ca_bundle=os.environ.get(CA_BUNDLE_ENV) or None,
        )


def is_s3(uri: str) -> bool:
    return uri.startswith(("s3://", "s3a://"))


def strip_scheme(uri: str) -> str:
    """The path a filesystem object understands: ``bucket/key`` for S3, absolute for local."""
    if is_s3(uri):
        return uri.split("://", 1)[1]
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    return os.path.abspath(os.path.expanduser(uri))


def join(base: str, *parts: str) -> str:
    if is_s3(base):
        return posixpath.join(base.rstrip("/"), *parts)
    return os.path.join(base, *parts)


@functools.lru_cache(maxsize=8)
def _s3(endpoint: str | None):
    import s3fs

    client_kwargs = {"endpoint_url": endpoint} if endpoint else {}
    # Retries with backoff for throttling and 5xx come from botocore's "standard" mode.
    config_kwargs = {"retries": {"max_attempts": 8, "mode": "standard"}}
    return s3fs.S3FileSystem(
        client_kwargs=client_kwargs, config_kwargs=config_kwargs, skip_instance_cache=True
    )


# A tar member's URI is SHARD#MEMBER: the shard's own URI, "#", the member's name.
MEMBER_SEPARATOR = "#"


def shard_of(uri: str) -> str:
    """The object a URI is read from: a tar member's shard, else the URI itself."""
    return uri.split(MEMBER_SEPARATOR, 1)[0]


def shards_of(uris: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """:func:`shard_of` over an Arrow string column, without a Python loop."""
    return pc.list_element(pc.split_pattern(uris, MEMBER_SEPARATOR, max_splits=1), 0)


def filesystem(uri: str, settings: StorageSettings) -> fsspec.AbstractFileSystem:
    """An fsspec filesystem for ``uri`` (cached per process, so Ray workers build it once)."""
    if is_s3(uri):
        return _s3(settings.s3_endpoint)
    if "://" in uri and not uri.startswith("file://"):
        raise MeddxError(f"unsupported URI scheme in {uri!r}: use a local path or s3://")
    return fsspec.filesystem("file")


def arrow_filesystem(uri: str, settings: StorageSettings) -> pafs.FileSystem:
    """The same filesystem wrapped for pyarrow and Ray Data's ``filesystem=`` argument."""
    if is_s3(uri):
        return pafs.PyFileSystem(pafs.FSSpecHandler(filesystem(uri, settings)))
    return pafs.LocalFileSystem()


class TooLarge(Exception):
    """An object over the byte limit, refused after reading at most limit + 1 bytes."""

    def __init__(self, size: int, limit: int):
        super().__init__(f"object of {size:,} bytes is over the limit of {limit:,}")
        self.size, self.limit = size, limit


# The first GET of an S3 object asks for this much: all of any radiograph, so one
# request per object; a longer object's size is then looked up before reading on.
FIRST_READ_BYTES = 64 * 2**20


def read_bytes(uri: str, settings: StorageSettings, max_bytes: int | None = None) -> bytes:
    """The object's bytes; with ``max_bytes``, a larger object raises TooLarge.

    A local file's size is checked first (a stat costs nothing). On S3 one ranged GET
    fetches up to FIRST_READ_BYTES: a normal object costs one request rather than a
    HEAD before every GET, and one over the limit is refused having cost at most that.
    """
    fs = filesystem(uri, settings)
    path = strip_scheme(uri)
    if max_bytes is None:
        return fs.cat_file(path)
    if not is_s3(uri):
        if os.path.isdir(path):
            raise IsADirectoryError(path)
        if (size := os.path.getsize(path)) > max_bytes:
            raise TooLarge(size, max_bytes)
        return fs.cat_file(path)
    first = min(max_bytes + 1, FIRST_READ_BYTES)
    try:
        data = fs.cat_file(path, start=0, end=first)
    except OSError as exc:
        # S3 answers any range on an empty object with 416 (not satisfiable).
        if exc.errno == errno.EINVAL and fs.size(path) == 0:
            return b""
        raise
    if len(data) < first:  # the whole object
        return data
    size = fs.size(path)
    if size > max_bytes:
        raise TooLarge(size, max_bytes)
    return data + fs.cat_file(path, start=len(data), end=size) if size > len(data) else data


def write_bytes(uri: str, data: bytes, settings: StorageSettings) -> None:
    fs = filesystem(uri, settings)
    path = strip_scheme(uri)
    if not is_s3(uri):
        fs.makedirs(os.path.dirname(path), exist_ok=True)
    fs.pipe_file(path, data)


def exists(uri: str, settings: StorageSettings) -> bool:
    return filesystem(uri, settings).exists(strip_scheme(uri))


def require_bucket(uri: str, settings: StorageSettings) -> None:
    """Refuse an s3:// URI whose bucket does not exist. s3fs creates a missing bucket on
    the first write, so a mistyped output bucket would quietly become a new bucket."""
    if not is_s3(uri):
        return
    bucket = strip_scheme(uri).split("/", 1)[0]
    try:
        filesystem(uri, settings).info(bucket)
    except FileNotFoundError:
        raise MeddxError(f"bucket s3://{bucket} does not exist (meddx never creates one)") from None
    except PermissionError:
        pass  # a role may write where it may not look: the write itself will tell


def absolute(uri: str) -> str:
    """A local path made absolute (another working folder finds it); a URI as it is."""
    return uri if "://" in uri else os.path.abspath(uri)


# A path part that is metadata (``_x``, ``.x``), as an Arrow regex over names below a root.
HIDDEN_PART = r"(^|/)[_.]"


def is_hidden(path: str) -> bool:
    """Names starting with ``_`` or ``.`` are metadata, never inputs (Hadoop/Spark convention)."""
    return any(
        part.startswith(("_", ".")) and part not in (".", "..") for part in path.split("/") if part
    )


def modified_time(info: dict) -> float | None:
    """When an fsspec listing entry (``fs.info``, ``fs.find(detail=True)``) was last
    modified, in seconds since the epoch; None when the filesystem does not say."""
    value = info.get("LastModified") or info.get("mtime") or info.get("created")
    if value is None:
        return None
    return value.timestamp() if hasattr(value, "timestamp") else float(value)


def missing_locally(uri: str) -> bool:
    """A local path (no scheme) that does not exist: what a run refuses before it starts
    Ray, which takes seconds."""
    return "://" not in uri and not os.path.exists(uri)
