"""Listing a prefix (S3) or folder: its top level at once, then one subtree at a time,
in URI order, with the size, modification time and ETag the listing itself returns (no
request per object); sub-prefixes in Ray tasks when there are several and Ray is up.
Metadata names (``_x``, ``.x``) below the prefix are never inputs.
"""

from __future__ import annotations

import posixpath

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from meddx import MeddxError
from meddx.inputs import storage
from meddx.inputs.storage import StorageSettings
from meddx.names import LISTING_BATCH_ROWS as BATCH_ROWS
from meddx.names import LISTING_SCHEMA

# A prefix or folder with at least this many sub-prefixes (sub-folders) is listed one
# per Ray task, in parallel, when Ray is up: each task's listing stays in that worker's
# memory and only its Arrow table comes back.
PARALLEL_PREFIXES = 4
LISTING_TASKS = 64  # at most, per listing: a prefix of 10^5 study folders is not 10^5 tasks


class Prefix:
    """A prefix (S3) or folder, listed as its top level now and then one subtree at a
    time: a listing table per subtree, in URI order, without metadata names."""

    def __init__(self, prefix: str, settings: StorageSettings):
        self.prefix, self.settings = prefix, settings
        self.root = storage.strip_scheme(prefix).rstrip("/") or "/"
        try:
            files, folders = _top_level(prefix, self.root, settings)
        except FileNotFoundError:
            raise MeddxError(f"input not found: {prefix}") from None
        except PermissionError as exc:
            raise MeddxError(f"cannot list {prefix}: access denied") from exc
        # In URI order a folder's objects start at "folder/": 'a-b/' and 'a b/' come
        # before 'a/' ('-' and ' ' sort below '/').
        self.folders = sorted(folders, key=lambda f: f + "/")
        self.files = self._clean(files)

    def batches(self):
        """The top level's objects and each subtree's, in URI order ('a.png' before
        'a/...', which comes before 'a0')."""
        tables = self._subtrees()
        at = 0
        for folder in self.folders:
            # Top-level objects before this folder, then the folder's own.
            key = self._uri(folder + "/")
            before = self.files.filter(pc.less(self.files["image_uri"], key))
            yield from before.slice(at).to_batches()
            at = before.num_rows
            table = self._clean(next(tables))
            if table.num_rows:
                yield from table.to_batches(BATCH_ROWS)
        yield from self.files.slice(at).to_batches()

    def _subtrees(self):
        """Each folder's table, in order: in Ray tasks when there are enough of them and
        Ray is up, a run of neighbouring folders per task (at most LISTING_TASKS)."""
        if len(self.folders) >= PARALLEL_PREFIXES and _ray_is_up():
            import ray

            task = ray.remote(num_cpus=0.25)(_subtrees).options(name="meddx.list_prefix")
            per = -(-len(self.folders) // LISTING_TASKS)
            runs = [self.folders[i : i + per] for i in range(0, len(self.folders), per)]
            refs = [task.remote(run, self.prefix, self.settings) for run in runs]
            for ref in refs:  # in order; the others wait in the object store
                yield from ray.get(ref)
            return
        for folder in self.folders:
            yield _subtree(folder, self.prefix, self.settings)

    def _uri(self, path: str) -> str:
        return f"s3://{path}" if storage.is_s3(self.prefix) else path

    def _clean(self, table: pa.Table) -> pa.Table:
        """Metadata names (_x, .x) below the prefix left out (the prefix itself may be
        one), S3 keys as s3:// URIs, sorted."""
        below = pc.utf8_slice_codeunits(table["image_uri"], len(self.root))
        table = table.filter(pc.invert(pc.match_substring_regex(below, storage.HIDDEN_PART)))
        if storage.is_s3(self.prefix):
            uris = pc.binary_join_element_wise("s3://", table["image_uri"], "")
            table = table.set_column(0, "image_uri", uris)
        return table.sort_by("image_uri").cast(LISTING_SCHEMA)


def _top_level(prefix: str, root: str, settings: StorageSettings) -> tuple[pa.Table, list[str]]:
    """The objects directly under ``root`` (or ``root`` itself, an object) and its
    sub-prefixes (sub-folders) but metadata ones, as paths of the store; raises
    FileNotFoundError when there is nothing."""
    if not storage.is_s3(prefix):
        fs = pafs.LocalFileSystem()
        (top,) = fs.get_file_info([root])
        if top.type == pafs.FileType.NotFound:
            raise FileNotFoundError(root)
        if top.type == pafs.FileType.File:
            return _local_table([top]), []
        entries = fs.get_file_info(pafs.FileSelector(root))
        folders = [e.path for e in entries if e.type == pafs.FileType.Directory]
        files = [e for e in entries if e.type == pafs.FileType.File]
        return _local_table(files), sorted(f for f in folders if not _hidden(f))
    fs = storage.filesystem(prefix, settings)
    fs.invalidate_cache(root)  # what the store holds now, not what this process saw before
    try:
        top = fs.ls(root, detail=True)  # one delimited listing
    except FileNotFoundError:
        top = []
    if not top:  # a bucket's top, one object, an empty prefix or nothing: one walk
        found = fs.find(root, detail=True)
        if not found:
            info = fs.info(root)  # raises FileNotFoundError for nothing
            found = {root: info} if info.get("type") != "directory" else {}
        return _infos_table(list(found.values())), []
    folders = [i["name"].rstrip("/") for i in top if i.get("type") == "directory"]
    files = [i for i in top if i.get("type") != "directory"]
    return _infos_table(files), sorted(f for f in folders if not _hidden(f))


def _hidden(path: str) -> bool:
    return posixpath.basename(path).startswith(("_", "."))


def _ray_is_up() -> bool:
    import sys

    ray = sys.modules.get("ray")  # never imported (nor started) for a listing
    return bool(ray and ray.is_initialized())


def _subtrees(folders: list[str], prefix: str, settings: StorageSettings) -> list[pa.Table]:
    """A run of neighbouring folders, listed one after the other (one task's share)."""
    return [_subtree(folder, prefix, settings) for folder in folders]


def _subtree(folder: str, prefix: str, settings: StorageSettings) -> pa.Table:
    """Every object below one sub-prefix or sub-folder (a task's share of a listing)."""
    if not storage.is_s3(prefix):
        fs = pafs.LocalFileSystem()
        entries = fs.get_file_info(pafs.FileSelector(folder, recursive=True))
        return _local_table([e for e in entries if e.type == pafs.FileType.File])
    found = storage.filesystem(prefix, settings).find(folder, detail=True)
    return _infos_table(list(found.values()))


def _local_table(files: list) -> pa.Table:
    mtimes = pa.array([e.mtime_ns for e in files], pa.int64())
    return pa.table(
        {
            "image_uri": pa.array([e.path for e in files], pa.string()),
            "size": pa.array([e.size for e in files], pa.int64()),
            "mtime": _ns_to_timestamp(mtimes),
            "etag": pa.nulls(len(files), pa.string()),
        }
    )


def _infos_table(infos: list[dict]) -> pa.Table:
    """A listing table of fsspec listing entries (folders left out)."""
    infos = [info for info in infos if info.get("type") != "directory"]
    seconds = pa.array([storage.modified_time(info) for info in infos], pa.float64())
    micros = pc.cast(pc.round(pc.multiply(seconds, 1e6)), pa.int64())
    return pa.table(
        {
            "image_uri": pa.array([info["name"] for info in infos], pa.string()),
            "size": pa.array([info.get("size") for info in infos], pa.int64()),
            "mtime": pc.cast(micros, pa.timestamp("us", tz="UTC")),
            "etag": pa.array([info.get("ETag") for info in infos], pa.string()),
        }
    )


def _ns_to_timestamp(ns: pa.Array) -> pa.Array:
    return pc.cast(pc.divide(ns, 1000), pa.int64()).cast(pa.timestamp("us", tz="UTC"))
