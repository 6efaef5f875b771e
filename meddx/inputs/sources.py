"""What to read, and reading it: loose objects, tar shards and manifests.

INPUT is one of
- a folder or s3:// prefix: every object under it, recursively;
- a ``.csv`` or ``.parquet`` manifest with a ``uri`` column (optional ``label`` and
  ``study_id``): only the listed objects, nothing is listed, so a night's new studies
  start scoring at once;
- and wherever an object ends in ``.tar`` (``.tar.gz``, ``.tgz``) it is a shard in the
  WebDataset layout: each image member gives one row, ``image_uri = SHARD#MEMBER``.

Names starting with ``_`` or ``.`` are metadata (manifests, markers, run artefacts),
never inputs, everywhere in meddx. Member names are only ever strings in the output:
nothing is extracted to a file system.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import hmac
import io
import lzma
import posixpath
import tarfile
import zlib
from collections import defaultdict, deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from meddx import MeddxError, one_line
from meddx.imaging.decode import DecodeSettings, decode_images
from meddx.inputs import dicomweb, storage
from meddx.inputs.storage import StorageSettings
from meddx.names import DEFAULT_MAX_OBJECT_BYTES, MANIFEST_NAME

MANIFEST_SUFFIXES = (".csv", ".parquet")
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
# Tar members that are images; companions (.json, .cls, .txt) are metadata, not inputs.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")
# A shard is streamed, never extracted; these bound what one hostile shard can cost.
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
# Rows per batch out of the read stage: bounds memory when one shard holds thousands.
READ_CHUNK = 64
# ... and bytes per batch: 64 detector films of 13-50 MB would make a block of 1-3 GB;
# half of Ray Data's 128 MiB target block size keeps every block one Ray can move.
READ_CHUNK_BYTES = 64 * 2**20
# Object reads in flight per read task: up to this many (an object store's latency, not
# its bandwidth, bounds one request at a time) ...
READ_CONCURRENCY = 8
# ... while the objects in flight, at the mean size read so far, stay under this: 8 x
# 512 px PNGs, but 2-4 x 30 MB DICOMs, so a node's read tasks cannot exhaust its memory.
READ_BYTES_IN_FLIGHT = 128 * 2**20


# A pseudonymous image_uri: the keyed hash of the path, and of a tar member's name after
# "#" (a shard's members stay grouped under their shard's pseudonym).
PATH_PSEUDONYM = "pseudonym:"


def path_pseudonym(uri: str, key: bytes) -> str:
    """``uri`` as ``pseudonym:HASH[#HASH]`` (HMAC-SHA256 with the site's key, in a
    domain of its own: no path hashes like a UID). A DICOMweb instance's URI is already
    a pseudonym and stays as it is."""
    if dicomweb.is_instance(uri) or is_path_pseudonym(uri):
        return uri
    base, sep, member = uri.partition("#")
    out = PATH_PSEUDONYM + _keyed(base, key)
    return out + "#" + _keyed(member, key) if sep else out


def is_path_pseudonym(uri: str) -> bool:
    return uri.startswith(PATH_PSEUDONYM)


def _keyed(text: str, key: bytes) -> str:
    return hmac.new(key, b"path\0" + text.encode(), hashlib.sha256).hexdigest()[:32]


def pseudonymize_paths(chunk: dict[str, np.ndarray], key: bytes) -> dict[str, np.ndarray]:
    """The read stage's rows with image_uri pseudonymized, and each path the row's
    error text quotes (a shard's, say) replaced by its pseudonym."""
    real = chunk["image_uri"]
    fake = np.array([path_pseudonym(u, key) for u in real], dtype=object)
    errors = []
    for uri, error in zip(real, chunk["read_error"], strict=True):
        base = uri.split("#", 1)[0]
        for path in (base, storage.strip_scheme(base)):  # as given, or as fsspec says it
            error = error.replace(path, path_pseudonym(base, key)) if error else error
        errors.append(error)
    return {**chunk, "image_uri": fake, "read_error": np.array(errors, dtype=object)}


def is_manifest(uri: str) -> bool:
    return uri.lower().endswith(MANIFEST_SUFFIXES)


def is_shard(uri: str) -> bool:
    return uri.split("#", 1)[0].lower().endswith(SHARD_SUFFIXES)


def list_inputs(
    input_uri: str, settings: StorageSettings, max_bytes: int = DEFAULT_MAX_OBJECT_BYTES
) -> list[str]:
    """The inputs named by INPUT (prefix, folder or manifest), in a stable order."""
    if is_manifest(input_uri):
        uris = read_manifest(input_uri, settings, max_bytes).column("uri").to_pylist()
        # A study listed twice is still one input.
        uris = list(dict.fromkeys(uris))
    else:
        uris = storage.list_files(input_uri, settings)
    if not uris:
        raise MeddxError(f"no inputs under {input_uri}")
    return uris


def list_located(
    input_uri: str,
    settings: StorageSettings,
    key: bytes | None = None,
    since_days: int | None = None,
    max_bytes: int = DEFAULT_MAX_OBJECT_BYTES,
) -> tuple[list[str], dict[str, str] | None]:
    """The inputs, and for a DICOMweb source each one's locator (dicomweb.py: what its
    retrieval needs, never written out); None for storage. ``since_days`` narrows a
    DICOMweb query to the studies of the last days; an empty answer is not an error
    there (a quiet night), the caller decides."""
    if dicomweb.is_source(input_uri):
        located = dicomweb.list_instances(input_uri, settings, key, since_days)
        return list(located), located
    return list_inputs(input_uri, settings, max_bytes), None


def read_manifest(
    uri: str, settings: StorageSettings, max_bytes: int = DEFAULT_MAX_OBJECT_BYTES
) -> pa.Table:
    """A manifest as a table with a non-null string ``uri`` column (CSV or Parquet),
    refused unread past ``max_bytes`` like any object. Its URIs are read with the run's
    own credentials: a manifest names what the run may read, so it is trusted input."""
    try:
        data = storage.read_bytes(uri, settings, max_bytes)
    except FileNotFoundError:
        raise MeddxError(f"manifest not found: {uri}") from None
    except storage.TooLarge as exc:
        raise MeddxError(f"manifest {uri}: {exc} (--max-object-bytes)") from None
    try:
        if uri.lower().endswith(".parquet"):
            table = pq.read_table(io.BytesIO(data))
        else:
            strings = pacsv.ConvertOptions(
                column_types={"uri": pa.string(), "label": pa.string(), "study_id": pa.string()}
            )
            table = pacsv.read_csv(io.BytesIO(data), convert_options=strings)
    except (pa.ArrowInvalid, OSError) as exc:
        raise MeddxError(f"cannot read manifest {uri}: {one_line(exc)}") from None
    if "uri" not in table.column_names:
        raise MeddxError(f"manifest {uri} needs a 'uri' column")
    # URIs in a manifest are taken as written: absolute paths or s3:// URIs.
    return table.filter(pc.is_valid(table["uri"]))


def manifest_labels(uri: str, settings: StorageSettings) -> dict[str, str]:
    """``uri -> label`` from a manifest (rows without a label are left out)."""
    table = read_manifest(uri, settings)
    if "label" not in table.column_names:
        raise MeddxError(f"manifest {uri} needs a 'label' column")
    return {
        u: str(lbl)
        for u, lbl in zip(table["uri"].to_pylist(), table["label"].to_pylist(), strict=True)
        if lbl not in (None, "")
    }


def manifest_findings(
    uri: str, settings: StorageSettings, findings: list[str] | tuple[str, ...]
) -> dict[str, tuple[int, ...]]:
    """``uri -> (0/1 per finding)`` from a multi-label manifest: one 0/1 column per
    finding, named as the finding. Rows with a missing value are left out."""
    table = read_manifest(uri, settings)
    missing = [f for f in findings if f not in table.column_names]
    if missing:
        raise MeddxError(f"manifest {uri} has no column for finding(s) {', '.join(missing)}")
    columns = [table[f].to_pylist() for f in findings]
    out = {}
    for i, u in enumerate(table["uri"].to_pylist()):
        values = [c[i] for c in columns]
        if any(v in (None, "") for v in values):
            continue
        try:
            flags = tuple(int(float(v)) for v in values)
        except ValueError:
            flags = (-1,)
        if not set(flags) <= {0, 1}:
            raise MeddxError(f"manifest {uri}: finding columns hold 0 or 1, not {values} ({u})")
        out[u] = flags
    return out


def label_from_path(uri: str) -> str:
    """The class folder an input sits in: ``.../opacity/x.png`` -> ``opacity``."""
    return posixpath.basename(posixpath.dirname(uri.split("#", 1)[0]))


def labelled_inputs(data_uri: str, settings: StorageSettings) -> list[tuple[str, str]]:
    """(uri, label) for training: a manifest given as DATA, ``DATA/_manifest.csv`` if
    present, else class folder names."""
    if is_manifest(data_uri):
        return sorted(manifest_labels(data_uri, settings).items())
    manifest = storage.join(data_uri, MANIFEST_NAME)
    if storage.exists(manifest, settings):
        return sorted(manifest_labels(manifest, settings).items())
    return [(uri, label_from_path(uri)) for uri in list_inputs(data_uri, settings)]


def labelled_findings(
    data_uri: str, settings: StorageSettings, findings: list[str] | tuple[str, ...]
) -> list[tuple[str, tuple[int, ...]]]:
    """(uri, 0/1 per finding) for multi-label training: from a manifest given as DATA or
    ``DATA/_manifest.csv`` (folder names cannot carry several findings)."""
    manifest = data_uri if is_manifest(data_uri) else storage.join(data_uri, MANIFEST_NAME)
    if not storage.exists(manifest, settings):
        raise MeddxError(f"multi-label training needs a manifest with finding columns: {manifest}")
    return sorted(manifest_findings(manifest, settings, findings).items())


# ---- the read stage (Ray CPU tasks) --------------------------------------------------


def read_object(
    uri: str, settings: StorageSettings, max_bytes: int = DEFAULT_MAX_OBJECT_BYTES
) -> tuple[bytes, str]:
    """(bytes, "") or (b"", reason): a missing, unreadable or oversized object is a value."""
    try:
        return storage.read_bytes(uri, settings, max_bytes), ""
    except storage.TooLarge as exc:
        return b"", f"{exc} (--max-object-bytes)"
    except FileNotFoundError:
        return b"", "object not found"
    except PermissionError:
        return b"", "access denied"
    except IsADirectoryError:
        return b"", "is a folder, not an object"
    except Exception as exc:  # network errors, throttling beyond the retries, ...
        return b"", f"read failed: {one_line(exc)}"


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
                    current = f"{uri}#{name}"
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


def read_objects(
    batch: dict[str, np.ndarray],
    settings: StorageSettings,
    max_bytes: int = DEFAULT_MAX_OBJECT_BYTES,
    decode: DecodeSettings | None = None,
    known: dict[str, list[str]] | None = None,
    path_key: bytes | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Fetch each input's bytes (expanding tar shards into their members), refusing any
    object or member over ``max_bytes`` unread.

    Yields batches of at most READ_CHUNK rows with ``bytes``, ``read_error`` and
    ``content_sha256`` added;
    other columns (a label, say) are carried along. "" means "no error": an all-None
    column does not survive Ray's Arrow conversion as None.

    With ``decode``, each batch is decoded (``decode_images``) before it leaves the
    task, after dropping the rows ``known`` lists as scored already (``drop_known``): a
    film's bytes (13-50 MB at detector size) then never pass through Ray's Arrow blocks,
    only its pixels at model size do. Two stages would copy the bytes into Arrow and
    back, 10 ms of a core per detector film.

    With ``path_key``, paths leave the task only as pseudonyms (``pseudonymize_paths``;
    ``known`` is then keyed by them, as OUT's index holds them).
    """
    for chunk in _read_chunks(batch, settings, max_bytes):
        if path_key:
            chunk = pseudonymize_paths(chunk, path_key)
        if known:
            chunk = drop_known(chunk, known)
        yield decode_images(chunk, decode) if decode is not None else chunk


def _read_chunks(
    batch: dict[str, np.ndarray], settings: StorageSettings, max_bytes: int
) -> Iterator[dict[str, np.ndarray]]:
    # A DICOMweb input's locator (its UIDs) is used to fetch it and goes no further.
    extra = [k for k in batch if k not in ("image_uri", "locator")]
    locators = (
        dict(zip(batch["image_uri"], batch["locator"], strict=True)) if "locator" in batch else {}
    )
    rows: list[tuple] = []

    def flush():
        out = {
            "image_uri": np.array([r[0] for r in rows], dtype=object),
            "bytes": np.array([r[1] for r in rows], dtype=object),
            "read_error": np.array([r[2] for r in rows], dtype=object),
            "content_sha256": np.array(
                [hashlib.sha256(r[1]).hexdigest() if not r[2] else "" for r in rows], dtype=object
            ),
        }
        for j, key in enumerate(extra):
            out[key] = np.array([r[3 + j] for r in rows], dtype=batch[key].dtype)
        rows.clear()
        return out

    def full() -> bool:
        return len(rows) >= READ_CHUNK or sum(len(r[1]) for r in rows) >= READ_CHUNK_BYTES

    inputs = [(uri, tuple(batch[k][i] for k in extra)) for i, uri in enumerate(batch["image_uri"])]
    for uri, carried in inputs:
        if is_shard(uri):
            for member_uri, data, error in read_shard(uri, settings, max_bytes):
                rows.append((member_uri, data, error, *carried))
                if full():
                    yield flush()
    objects = [(uri, carried) for uri, carried in inputs if not is_shard(uri)]
    for (uri, carried), (data, error) in zip(
        objects,
        fetch_all([uri for uri, _ in objects], settings, max_bytes, locators),
        strict=True,
    ):
        rows.append((uri, data, error, *carried))
        if full():
            yield flush()
    if rows:
        yield flush()


def fetch_all(
    uris: list[str],
    settings: StorageSettings,
    max_bytes: int,
    locators: dict[str, str] | None = None,
) -> Iterator[tuple[bytes, str]]:
    """read_object for each URI, in order, with READ_CONCURRENCY requests in flight: an
    object store's or a PACS's latency, not its bandwidth, bounds one request at a time.
    A DICOMweb instance is retrieved by its locator. Local files are read one by one
    (no latency to hide)."""
    locators = locators or {}

    def fetch(uri: str) -> tuple[bytes, str]:
        if dicomweb.is_instance(uri):
            if uri not in locators:
                return b"", "a DICOMweb instance is read only in the run that listed it"
            return dicomweb.read(locators[uri], settings, max_bytes)
        return read_object(uri, settings, max_bytes)

    if not any(storage.is_s3(uri) or dicomweb.is_instance(uri) for uri in uris):
        yield from (read_object(uri, settings, max_bytes) for uri in uris)
        return
    read_bytes, read_count = 0, 0
    with ThreadPoolExecutor(READ_CONCURRENCY) as pool:
        pending: deque = deque()
        for uri in uris:
            pending.append(pool.submit(fetch, uri))
            while pending and len(pending) >= reads_in_flight(read_bytes, read_count):
                result = pending.popleft().result()
                read_bytes, read_count = read_bytes + len(result[0]), read_count + 1
                yield result
        while pending:
            yield pending.popleft().result()


def reads_in_flight(read_bytes: int, read_count: int) -> int:
    """How many reads may be in flight, given the bytes of the objects read so far: up to
    READ_CONCURRENCY while READ_BYTES_IN_FLIGHT holds that many at their mean size."""
    if not read_count:
        return 1  # sizes unknown yet: one read tells them
    mean = max(1, read_bytes // read_count)
    return max(1, min(READ_CONCURRENCY, READ_BYTES_IN_FLIGHT // mean))


def read_uris(
    uris: list[str],
    settings: StorageSettings,
    max_bytes: int = DEFAULT_MAX_OBJECT_BYTES,
    locators: dict[str, str] | None = None,
) -> list[tuple[bytes, str]]:
    """(bytes, error) behind each image_uri, in order, a tar member (SHARD#MEMBER)
    included, with the read stage's limits: each shard is streamed once for all of its
    members asked for, loose objects are fetched as the read stage fetches them."""
    wanted: dict[str, set[str]] = defaultdict(set)
    for uri in uris:
        if "#" in uri and is_shard(uri):
            wanted[uri.split("#", 1)[0]].add(uri)
    found: dict[str, tuple[bytes, str]] = {}
    for shard, members in wanted.items():
        shard_error = ""
        for member_uri, data, error in read_shard(shard, settings, max_bytes):
            if member_uri in members:
                found[member_uri] = (data, error)
            if member_uri == shard or (error and shard in error):
                shard_error = error  # the shard ended here: missing members say why
        for uri in members - found.keys():
            found[uri] = (b"", shard_error or f"no such member in tar shard {shard}")
    loose = list(dict.fromkeys(u for u in uris if u not in found))
    found.update(zip(loose, fetch_all(loose, settings, max_bytes, locators), strict=True))
    return [found[uri] for uri in uris]


def drop_known(batch: dict[str, np.ndarray], known: dict[str, list[str]]) -> dict[str, np.ndarray]:
    """Drop rows whose (image_uri, content_sha256) was already scored: an object that was
    touched but not changed. Unreadable rows are kept (they become error rows)."""
    keep = np.array(
        [
            not (sha and sha in known.get(uri, ()))
            for uri, sha in zip(batch["image_uri"], batch["content_sha256"], strict=True)
        ],
        dtype=bool,
    )
    return {k: v[keep] for k, v in batch.items()}
