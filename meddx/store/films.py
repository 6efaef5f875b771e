"""A store of model-ready films (``meddx prepare``): each input decoded once, kept at a
canonical size, and read by ``score``, ``screen`` and ``train`` instead of decoding.

    STORE/_store.json                 what every film in it was made with (the decoder)
    STORE/dt=RUN_DATE/RUN_ID-*.parquet one row per input (a tar shard: per member)
    STORE/_index/                      the index of OUT (``index.py``), over the store

A row (``STORE_SCHEMA``) holds the film after the modality and VOI LUTs, the window and
MONOCHROME1, with its short side at the store's size and its aspect kept, as a PNG of 8
bits (what the models take); the pixel figures the quality check reads; the DICOM
attributes that identify no one, and the UIDs' keyed pseudonyms, as results hold them;
the source's URI and content hash; and ``decode_sha256``, the fingerprint of the decode
settings (``FilmSettings``) that made it. An input that could not be decoded has its row
too, with its one-line error. The size, mtime and ETag the listing gave are in the
store's index, which names the decode fingerprint ``model_sha256`` (what made the row).

Rows reach the store through the same staging, commit and lease as results, so a
second ``prepare`` selects by the same join as a screening night: only inputs the store
has no row for, or whose size, mtime, ETag or content changed. A store is one decoder's:
``_store.json`` is written by its first run, and any run with other settings is refused.
Readers take, for each input, the rows of the last run that prepared it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import logging
import posixpath
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import imagecodecs
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from meddx import MeddxError, __version__
from meddx.imaging import dicom
from meddx.imaging.decode import (
    INFO_DEFAULTS,
    DecodeSettings,
    decode_each,
    decoded_columns,
    pixel_figures,
    qc_of,
    sniff,
)
from meddx.inputs import storage
from meddx.inputs.path_pseudonyms import pseudonymize_paths
from meddx.inputs.reading import drop_known
from meddx.inputs.storage import StorageSettings
from meddx.names import DEFAULT_MAX_PIXELS, OUTPUT_SCHEMA
from meddx.store import index, sql

STORE_FILE = "_store.json"
# What a row holds and how its film was made; a change to either is a new format, and a
# store of another format is refused rather than mixed.
STORE_FORMAT = 1
# zlib level of the stored PNGs: on the realistic mix at 512 px, level 1 packs a film in
# 141 KB against level 6's 130 KB, in 6 ms of a core against 52 (docs/store.md).
PNG_LEVEL = 1

_INFO = [OUTPUT_SCHEMA.field(name) for name in INFO_DEFAULTS]
STORE_SCHEMA = pa.schema(
    [
        ("image_uri", pa.string()),  # the source's URI (a tar member: SHARD#MEMBER)
        ("status", pa.string()),
        ("error", pa.string()),
        ("format", pa.string()),  # png, jpeg or dicom, as its bytes said
        ("image", pa.binary()),  # 8-bit grayscale PNG, short side at the store's size
        ("width", pa.int32()),
        ("height", pa.int32()),
        # The quality check's figures at the store's size, in 8-bit levels.
        ("pixel_std", pa.float32()),
        ("pixel_p01", pa.float32()),
        ("pixel_p99", pa.float32()),
        ("pixel_clipped", pa.float32()),
        ("content_sha256", pa.string()),
        *_INFO,
        ("decode_sha256", pa.string()),  # FilmSettings.sha256
        ("prepared_at", pa.timestamp("us", tz="UTC")),
        ("run_id", pa.string()),
    ]
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FilmSettings:
    """What decides a stored film's pixels and pseudonyms: a store holds films of one."""

    size: int  # the short side
    max_pixels: int = DEFAULT_MAX_PIXELS
    key_id: str = ""  # which pseudonym key made the UIDs' pseudonyms ("" without one)
    format: int = STORE_FORMAT

    @property
    def sha256(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def decode(self, key: bytes | None) -> DecodeSettings:
        """Any modality and view: a store keeps every film; the run that reads it decides
        what it accepts, as it would decoding the source."""
        return DecodeSettings(
            size=self.size,
            max_pixels=self.max_pixels,
            modalities=None,
            views=None,
            pseudonym_key=key,
            square=False,
        )

    def describe(self) -> str:
        key = f"pseudonym key {self.key_id[:8]}" if self.key_id else "no pseudonym key"
        return f"size {self.size}, max pixels {self.max_pixels:,}, {key}, format {self.format}"


def key_id(key: bytes | None) -> str:
    """A name for the site's pseudonym key that reveals nothing of it ("" without one)."""
    return hmac.new(key, b"meddx.store.key", hashlib.sha256).hexdigest()[:16] if key else ""


def _marker(uri: str) -> str:
    return posixpath.join(storage.strip_scheme(uri).rstrip("/"), STORE_FILE)


def read_settings(uri: str, settings: StorageSettings) -> FilmSettings | None:
    """The settings STORE was made with, or None where ``uri`` is no store."""
    if "://" in uri and not storage.is_s3(uri) and not uri.startswith("file://"):
        return None  # a DICOMweb server, say
    fs = storage.filesystem(uri, settings)
    try:
        data = fs.cat_file(_marker(uri))
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None
    except PermissionError:
        raise MeddxError(f"cannot read {uri}: access denied") from None
    try:
        fields = json.loads(data)
        return FilmSettings(**{k: fields[k] for k in ("size", "max_pixels", "key_id", "format")})
    except (ValueError, KeyError, TypeError):
        raise MeddxError(f"{uri} has an unreadable {STORE_FILE}: not a store meddx made") from None


def is_store(uri: str, settings: StorageSettings) -> bool:
    return read_settings(uri, settings) is not None


@dataclass(frozen=True)
class Store:
    uri: str
    films: FilmSettings


def open_store(
    uri: str, settings: StorageSettings, input_size: int, key: bytes | None
) -> Store | None:
    """The store at ``uri`` for a model of ``input_size``, or None where ``uri`` is no
    store: refused in one line when its films are smaller than the model's input, or
    their pseudonyms were made with another key than the site's."""
    films = read_settings(uri, settings)
    if films is None:
        return None
    if films.size < input_size:
        raise MeddxError(
            f"{uri} keeps films at {films.size} px, smaller than the model's input "
            f"({input_size} px): prepare a store with --size {input_size} or more"
        )
    if films.key_id != key_id(key):
        raise MeddxError(
            f"{uri} was prepared with {films.describe().split(', ')[2]}, not the site's "
            "current one: prepare into another store"
        )
    return Store(uri, films)


def claim(uri: str, settings: StorageSettings, films: FilmSettings) -> None:
    """Make STORE one of ``films`` (its first run), or refuse a store made otherwise:
    films of two decoders are never mixed. Called under the store's lease."""
    found = read_settings(uri, settings)
    if found is None:
        record = {**asdict(films), "decode_sha256": films.sha256, "meddx_version": __version__}
        storage.write_bytes(
            storage.join(uri, STORE_FILE), json.dumps(record, indent=2).encode(), settings
        )
    elif found != films:
        raise MeddxError(
            f"{uri} holds films made with {found.describe()}, not {films.describe()}: "
            "prepare into another store"
        )


def file_metadata(films: FilmSettings, run_id: str, run_date: str) -> dict[str, str]:
    """Provenance in every store file's key-value metadata (no credentials, no PHI)."""
    return {
        "meddx.version": __version__,
        "meddx.run_id": run_id,
        "meddx.run_date": run_date,
        "meddx.store": json.dumps(asdict(films)),
        "meddx.decode_sha256": films.sha256,
    }


def run_bytes(uri: str, settings: StorageSettings, run_id: str) -> int:
    """The bytes of the files a run committed to the store."""
    fs = storage.filesystem(uri, settings)
    fs.invalidate_cache()
    root = storage.strip_scheme(uri).rstrip("/")
    found = fs.find(root, detail=True) if fs.exists(root) else {}
    return sum(
        info.get("size") or 0
        for path, info in found.items()
        if posixpath.basename(path).startswith(f"{run_id}-") and path.endswith(".parquet")
    )


# ---- writing: the prepare stage -------------------------------------------------------------


def film_rows(chunk: dict[str, np.ndarray], decode: DecodeSettings, sha: str, run_id: str):
    """A read chunk (bytes, read_error, content_sha256) -> STORE_SCHEMA rows: each film
    decoded at the store's size, its pixel figures and its PNG. Runs in the read task,
    so a film's bytes never leave it."""
    rows: dict[str, list] = {f.name: [] for f in STORE_SCHEMA}
    formats = [_format(b) for b in chunk["bytes"]]
    for pixels, info, error, status in decode_each(chunk, decode):
        figures = pixel_figures(pixels) if pixels is not None else {}
        rows["status"].append(status)
        rows["error"].append(error or None)
        rows["image"].append(None if pixels is None else _png(pixels))
        rows["height"].append(None if pixels is None else pixels.shape[0])
        rows["width"].append(None if pixels is None else pixels.shape[1])
        for name in ("pixel_std", "pixel_p01", "pixel_p99", "pixel_clipped"):
            rows[name].append(figures.get(name))
        for name in INFO_DEFAULTS:
            rows[name].append(info[name] or None)
    n = len(chunk["image_uri"])
    now = dt.datetime.now(dt.UTC)
    rows["image_uri"] = chunk["image_uri"].tolist()
    rows["format"] = [
        f if s == "ok" else None for f, s in zip(formats, rows["status"], strict=True)
    ]
    rows["content_sha256"] = [h or None for h in chunk["content_sha256"].tolist()]
    rows["decode_sha256"] = [sha] * n
    rows["prepared_at"] = [now] * n
    rows["run_id"] = [run_id] * n
    return pa.Table.from_pydict(rows, schema=STORE_SCHEMA)


def _format(data: bytes) -> str:
    """A decoded film's format: PNG and JPEG by their magic numbers, else DICOM (the
    only other format that decodes)."""
    head = sniff(data[:132]) if len(data) >= 132 else sniff(data)
    return head if head in ("png", "jpeg") else "dicom"


def _png(pixels: np.ndarray) -> bytes:
    return bytes(imagecodecs.png_encode(np.ascontiguousarray(pixels), level=PNG_LEVEL))


# ---- reading: a store as a run's films -------------------------------------------------------


# Each input's rows in the store: those of the last run that prepared it (a shard's
# members, in one or more files of that run), with what the listing said of it then.
LATEST_SQL = """
WITH rows AS (SELECT name, run_id, scored_at, size, mtime, etag, file FROM idx),
last AS (
    SELECT name, arg_max(run_id, scored_at) AS run_id, arg_max(size, scored_at) AS size,
           arg_max(mtime, scored_at) AS mtime, arg_max(etag, scored_at) AS etag
    FROM rows GROUP BY name
)
SELECT l.name AS image_uri, l.size, l.mtime, l.etag,
       list_sort(list(DISTINCT r.file)) AS store_files
FROM last l JOIN rows r USING (name, run_id)
{where}
GROUP BY ALL ORDER BY image_uri
"""


def located(uri: str, settings: StorageSettings, names: pa.Table | None = None) -> pa.Table:
    """The store's inputs (``image_uri`` as listed: a shard, not its members) with size,
    mtime and etag as the listing gave them when they were prepared, and ``store_files``:
    the files holding their rows. ``names``: only these inputs (a table with
    ``image_uri``); those the store lacks have no row."""
    snapshot = index.Snapshot(uri, settings)
    con = sql.connect()
    try:
        columns = ["name", "run_id", "scored_at", "size", "mtime", "etag", "file"]
        con.register("idx", snapshot.scan(columns))
        where = ""
        if names is not None:
            con.register("wanted", names.select(["image_uri"]))
            where = "WHERE l.name IN (SELECT image_uri FROM wanted)"
        return con.sql(LATEST_SQL.format(where=where)).to_arrow_table()
    finally:
        con.close()


def locate(uri: str, settings: StorageSettings, todo: pa.Table) -> pa.Table:
    """``todo`` with ``store_files`` added (null for an input the store lacks)."""
    found = located(uri, settings, todo)
    where = pc.index_in(todo["image_uri"], value_set=found["image_uri"].combine_chunks())
    return todo.append_column("store_files", found["store_files"].take(where))


MISSING = "not in the store: run meddx prepare on its source first"


def read_films(
    batch: dict[str, np.ndarray],
    store: str,
    settings: StorageSettings,
    decode: DecodeSettings,
    path_key: bytes | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """The read stage over a store: each input's stored rows (``store_files``, from
    ``locate``) as the decode stage would give them from its bytes, resized to the
    model's size, its modality and view checked as decoding checks them. Other columns
    (``known``, a label) are carried; ``known`` drops rows already scored, by the
    stored content hash, as for any input."""
    extra = [k for k in batch if k not in ("image_uri", "store_files")]
    by_file: dict[str, set[str]] = {}
    for name, files in zip(batch["image_uri"], batch["store_files"], strict=True):
        for file in files if files is not None else ():
            by_file.setdefault(file, set()).add(name)
    found: dict[str, list[dict]] = {}
    fs = storage.arrow_filesystem(store, settings)
    root = storage.strip_scheme(store).rstrip("/")
    for file, names in sorted(by_file.items()):
        table = pq.read_table(posixpath.join(root, file), filesystem=fs, schema=STORE_SCHEMA)
        keep = pc.is_in(storage.shards_of(table["image_uri"]), value_set=pa.array(sorted(names)))
        for row in table.filter(keep).to_pylist():
            found.setdefault(storage.shard_of(row["image_uri"]), []).append(row)
    rows, carried = [], []
    for i, name in enumerate(batch["image_uri"]):
        stored = found.get(name) or [{"image_uri": name, "status": "error", "error": MISSING}]
        for row in sorted(stored, key=lambda r: r["image_uri"]):
            rows.append(row)
            carried.append(i)
    chunk = {
        "image_uri": np.array([r["image_uri"] for r in rows], dtype=object),
        "read_error": np.array(
            [(r.get("error") or "error") if r["status"] != "ok" else "" for r in rows], dtype=object
        ),
        "content_sha256": np.array([r.get("content_sha256") or "" for r in rows], dtype=object),
        "row": np.arange(len(rows)),
        **{k: _take(batch[k], carried) for k in extra},
    }
    if path_key:
        chunk = pseudonymize_paths(chunk, path_key)
    chunk = drop_known(chunk)
    yield _as_decoded(chunk, [rows[i] for i in chunk.pop("row")], decode)


def read_uris(
    store: str, settings: StorageSettings, uris: list[str], decode: DecodeSettings
) -> list[tuple[np.ndarray | None, str]]:
    """(model-size pixels, "") or (None, reason) for each URI (a tar member's too), in
    order, from the store's films: what ``explain`` and the report's heatmaps read when
    the run came through a store."""
    names = sorted({storage.shard_of(u) for u in uris})
    where = locate(store, settings, pa.table({"image_uri": pa.array(names, pa.string())}))
    files = np.empty(len(names), dtype=object)
    files[:] = where["store_files"].to_pylist()
    batch = {"image_uri": np.array(names, dtype=object), "store_files": files}
    out = next(read_films(batch, store, settings, decode))
    found = {
        uri: (out["image"][i] if status == "ok" else None, error)
        for i, (uri, status, error) in enumerate(
            zip(out["image_uri"], out["status"], out["error"], strict=True)
        )
    }
    return [found.get(uri, (None, MISSING)) for uri in uris]


def _take(column: np.ndarray, where: list[int]) -> np.ndarray:
    out = np.empty(len(where), dtype=column.dtype)
    for j, i in enumerate(where):
        out[j] = column[i]
    return out


def to_model_size(film: np.ndarray, size: int) -> np.ndarray:
    """A stored film (uint8, already reduced with antialiasing) squashed to size x size
    in one antialiased bilinear step: on the realistic mix this lands 0.30 grey levels
    from the direct path's pixels on average (99th percentile: 1), against 0.67 (4) for
    ``decode.resize``'s box step then bilinear, which suits full-size films."""
    return np.asarray(Image.fromarray(film, mode="L").resize((size, size), Image.BILINEAR))


def _as_decoded(chunk: dict, rows: list[dict], decode: DecodeSettings) -> dict[str, np.ndarray]:
    """Stored rows -> the decode stage's batch (``decoded_columns``) at the model's size."""
    n = len(rows)
    images = np.zeros((n, decode.size, decode.size), dtype=np.uint8)
    errors, qc, infos, skipped = [], [], [], []
    for i, (row, error) in enumerate(zip(rows, chunk["read_error"], strict=True)):
        info = {name: row.get(name) or default for name, default in INFO_DEFAULTS.items()}
        # Selected out when prepared (the rules on the header), or by the run's modalities.
        out = row.get("status") == "skipped"
        if not error and row.get("format") == "dicom":
            refused = dicom.refused_modality(info["modality"], decode.modalities)
            error, out = (f'rule "modality": {refused}', True) if refused else ("", False)
        if not error and info["rows"] * info["columns"] > decode.max_pixels:
            error = (
                f"{info['columns']}x{info['rows']} pixels exceeds the limit of "
                f"{decode.max_pixels:,} (possible decompression bomb)"
            )
        checked = ""
        if not error:
            try:
                film = imagecodecs.png_decode(row["image"])
                images[i] = to_model_size(film, decode.size)
                checked = qc_of(images[i], info, decode)
            except Exception as exc:  # a damaged row is its own error, never the block's
                error = f"stored film unreadable ({type(exc).__name__})"
        if error and not out:
            info = INFO_DEFAULTS
        errors.append(error)
        qc.append(checked)
        infos.append(info)
        skipped.append(out)
    passthrough = {k: v for k, v in chunk.items() if k != "read_error"}
    return decoded_columns(passthrough, images, errors, qc, infos, skipped)
