"""The read stage: each input's bytes, fetched in Ray CPU tasks with bounded memory.

Loose objects are fetched several at a time (an object store's latency, not its
bandwidth, bounds one request), tar shards are streamed member by member
(``shards.py``), PACS instances retrieved by their locators (``dicomweb.py``,
``dimse.py``). A missing, unreadable or oversized object is a row with its reason, never
an exception that kills a block. Rows may leave the task decoded (``decode_images``), so
a film's bytes never pass through Ray's Arrow blocks, and with pseudonymous paths.

An input's ``content_sha256`` is the hash of its bytes, but for a PACS instance the hash
of its dataset alone (``content_sha256``): each server writes its own Part 10 file meta
(implementation UID, source AE title), so the same instance over WADO-RS and over C-GET
differs there and nowhere else.
"""

from __future__ import annotations

import hashlib
import io
from collections import defaultdict, deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from meddx import one_line
from meddx.imaging.decode import DecodeSettings, decode_images
from meddx.inputs import dicomweb, dimse, storage
from meddx.inputs.path_pseudonyms import pseudonymize_paths
from meddx.inputs.shards import is_shard, read_shard
from meddx.inputs.storage import MEMBER_SEPARATOR, StorageSettings
from meddx.names import DEFAULT_MAX_OBJECT_BYTES

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


def read_objects(
    batch: dict[str, np.ndarray],
    settings: StorageSettings,
    max_bytes: int = DEFAULT_MAX_OBJECT_BYTES,
    decode: DecodeSettings | None = None,
    path_key: bytes | None = None,
    rows_of: Callable[[dict[str, np.ndarray]], Any] | None = None,
) -> Iterator[Any]:
    """Fetch each input's bytes (expanding tar shards into their members), refusing any
    object or member over ``max_bytes`` unread.

    Yields batches of at most READ_CHUNK rows with ``bytes``, ``read_error`` and
    ``content_sha256`` added;
    other columns (a label, say) are carried along. "" means "no error": an all-None
    column does not survive Ray's Arrow conversion as None.

    With ``decode``, each batch is decoded (``decode_images``) before it leaves the
    task, after dropping the rows scored already (``drop_known``, by the batch's ``known``
    column): a film's bytes (13-50 MB at detector size) then never pass through Ray's
    Arrow blocks, only its pixels at model size do. Two stages would copy the bytes into
    Arrow and back, 10 ms of a core per detector film.

    With ``path_key``, paths leave the task only as pseudonyms (``pseudonymize_paths``;
    the ``known`` column then names them, as OUT's index holds them).

    ``rows_of``, in place of ``decode``: what each read chunk becomes instead (a store's
    rows, ``films.film_rows``), in the same task.
    """
    for chunk in _read_chunks(batch, settings, max_bytes):
        if path_key:
            chunk = pseudonymize_paths(chunk, path_key)
        chunk = drop_known(chunk)
        if rows_of is not None:
            yield rows_of(chunk)
        else:
            yield decode_images(chunk, decode) if decode is not None else chunk


def _read_chunks(
    batch: dict[str, np.ndarray], settings: StorageSettings, max_bytes: int
) -> Iterator[dict[str, np.ndarray]]:
    # A PACS input's locator (its UIDs) is used to fetch it and goes no further.
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
                [content_sha256(r[0], r[1]) if not r[2] else "" for r in rows], dtype=object
            ),
        }
        for j, key in enumerate(extra):
            out[key] = _column([r[3 + j] for r in rows], batch[key].dtype)
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


def content_sha256(uri: str, data: bytes) -> str:
    """The hash that says whether an input changed: of its bytes, or for a PACS instance
    of the bytes after its preamble and file meta (``dataset_offset``)."""
    if dicomweb.is_instance(uri) or dimse.is_instance(uri):
        return hashlib.sha256(memoryview(data)[dataset_offset(data) :]).hexdigest()
    return hashlib.sha256(data).hexdigest()


def dataset_offset(data: bytes) -> int:
    """Where a Part 10 file's dataset starts, after the preamble, "DICM" and the file
    meta group; 0 where there is no "DICM" (a bare dataset, or no DICOM at all) or the
    meta cannot be read: then the whole bytes are the content."""
    import pydicom.filereader

    fp = io.BytesIO(data)
    try:
        pydicom.filereader.read_preamble(fp, False)
        pydicom.filereader._read_file_meta_info(fp)
    except Exception:
        return 0
    return fp.tell()


def _column(values: list, dtype: np.dtype) -> np.ndarray:
    """A carried column, one element per row even where each is itself an array (a
    ``known`` list): numpy would make equal-length arrays a 2-D block."""
    if dtype.kind != "O":
        return np.array(values, dtype=dtype)
    out = np.empty(len(values), dtype=object)
    for i, value in enumerate(values):
        out[i] = value
    return out


def fetch_all(
    uris: list[str],
    settings: StorageSettings,
    max_bytes: int,
    locators: dict[str, str] | None = None,
) -> Iterator[tuple[bytes, str]]:
    """read_object for each URI, in order, with READ_CONCURRENCY requests in flight: an
    object store's or a PACS's latency, not its bandwidth, bounds one request at a time.
    A PACS instance is retrieved by its locator: over DICOMweb, or by C-GET on an
    association of its own (a few milliseconds to open beside the film's transfer, and
    no association is shared between threads). Local files are read one by one (no
    latency to hide)."""
    locators = locators or {}

    def fetch(uri: str) -> tuple[bytes, str]:
        for pacs, kind in ((dicomweb, "DICOMweb"), (dimse, "DIMSE")):
            if pacs.is_instance(uri):
                if uri not in locators:
                    return b"", f"a {kind} instance is read only in the run that listed it"
                return pacs.read(locators[uri], settings, max_bytes)
        return read_object(uri, settings, max_bytes)

    remote = (storage.is_s3, dicomweb.is_instance, dimse.is_instance)
    if not any(test(uri) for uri in uris for test in remote):
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
        if MEMBER_SEPARATOR in uri and is_shard(uri):
            wanted[storage.shard_of(uri)].add(uri)
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


# Between an input's name and a content hash in a ``known`` column's strings.
KNOWN_SEPARATOR = "\0"


def drop_known(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Drop rows whose (image_uri, content_sha256) was already scored: an object that was
    touched but not changed. Unreadable rows are kept (they become error rows).

    What was scored comes with the rows, in a ``known`` column (each input's
    ``NAME KNOWN_SEPARATOR SHA`` strings, null for a new one; a shard's rows all carry
    its list), which is then dropped. A run of several models carries ``models``, each
    row's bit mask of the models to score it with, and ``known`` strings led by their
    model's number and the separator: a model that scored these bytes loses its bit,
    and a row with no bit left is dropped."""
    carried = batch.get("known")
    if carried is None:
        return batch
    uris, shas = batch["image_uri"], batch["content_sha256"]
    masks = batch.get("models")
    if masks is None:
        keep = np.array(
            [
                not (sha and listed is not None and f"{uri}{KNOWN_SEPARATOR}{sha}" in listed)
                for uri, sha, listed in zip(uris, shas, carried, strict=True)
            ],
            dtype=bool,
        )
        return {k: v[keep] for k, v in batch.items() if k != "known"}
    masks = np.array(masks, dtype=np.int64)
    for i, (uri, sha, listed) in enumerate(zip(uris, shas, carried, strict=True)):
        if not sha or listed is None:
            continue
        scored = {s for s in listed if s.endswith(f"{KNOWN_SEPARATOR}{uri}{KNOWN_SEPARATOR}{sha}")}
        for entry in scored:
            masks[i] &= ~(1 << int(entry.split(KNOWN_SEPARATOR, 1)[0]))
    keep = masks != 0
    out = {k: v[keep] for k, v in batch.items() if k not in ("known", "models")}
    return {**out, "models": masks[keep]}
