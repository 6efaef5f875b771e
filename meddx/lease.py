"""One writer per results tree: the lease a run takes on OUT before it writes.

``OUT/_LOCK`` is a small JSON object: the holder's run id, host, pid, command, start
time and heartbeat. It is created atomically, so of two runs that start at once exactly
one gets it:

- on S3 by a conditional put (``If-None-Match: *``; AWS S3, MinIO and moto's server
  honour it); the holder renews it with ``If-Match`` on the ETag it last wrote, so a
  holder whose lease was taken over finds out at its next renewal;
- on a local (or shared POSIX) file system by ``link(2)`` of a fully written temporary
  file, which fails when the name exists.

A lease whose heartbeat is older than the lock timeout belongs to a run that died (a
killed process renews nothing); so does one whose holder ran on this host under a pid
that no longer exists. The next run takes it over with the same conditional
write against the stale ETag (S3) or by renaming the stale file away (local), so two
runs that find the same stale lease cannot both take it, and then recovers the dead
run's staging as every run does. Heartbeats compare the holder's clock with the
reader's: the hosts must keep time (NTP), as they must for the run dates anyway.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import posixpath
import signal
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass

from meddx import MeddxBusy, MeddxError, storage
from meddx.storage import StorageSettings

LOCK = "_LOCK"
DEFAULT_LOCK_TIMEOUT = 300.0  # seconds without a heartbeat before a lease is stale
RENEWALS_PER_TIMEOUT = 5  # a holder renews this often within one timeout
POLL_SECONDS = 2.0  # how often a waiting run looks at the lease again


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class Holder:
    """What a lock object says about its run."""

    run_id: str
    host: str
    pid: int
    command: str
    started: str
    heartbeat: str

    @property
    def age(self) -> float:
        """Seconds since its last heartbeat."""
        return (_now() - dt.datetime.fromisoformat(self.heartbeat)).total_seconds()

    def describe(self) -> str:
        return (
            f"run {self.run_id} ({self.command} on {self.host}, pid {self.pid}; "
            f"heartbeat {self.age:.0f} s ago)"
        )


def _parse(data: bytes) -> Holder | None:
    try:
        return Holder(**json.loads(data))
    except (ValueError, TypeError):
        return None  # not ours, or torn: judged by the file's age below


class _Store:
    """Create, read, replace and remove OUT/_LOCK atomically, on S3 or a local disk."""

    def __init__(self, out: str, settings: StorageSettings):
        self.s3 = storage.is_s3(out)
        self.fs = storage.filesystem(out, settings)
        self.path = posixpath.join(storage.strip_scheme(out), LOCK)

    def read(self) -> tuple[Holder | None, str | None, float] | None:
        """The lock (None if there is none): its holder, a version tag, its age by the
        store's clock of last change when the content is unreadable."""
        if self.s3:
            from fsspec.asyn import sync

            try:
                data, etag, modified = sync(self.fs.loop, self._get)
            except FileNotFoundError:
                return None
            return _parse(data), etag, time.time() - modified.timestamp()
        try:
            with open(self.path, "rb") as fh:
                data = fh.read()
                modified = os.fstat(fh.fileno()).st_mtime
        except FileNotFoundError:
            return None
        return _parse(data), data.decode(errors="replace"), time.time() - modified

    async def _get(self):
        """The object and its ETag from one GET: the tag is that of the bytes read."""
        bucket, key, _ = self.fs.split_path(self.path)
        got = await self.fs._call_s3("get_object", Bucket=bucket, Key=key)
        async with got["Body"] as body:
            data = await body.read()
        return data, got["ETag"], got["LastModified"]

    def create(self, holder: Holder) -> str | None:
        """Write the lock if there is none; its version tag, or None if one exists."""
        data = json.dumps(holder.__dict__).encode()
        if self.s3:
            bucket, key, _ = self.fs.split_path(self.path)
            try:
                put = self.fs.call_s3(
                    "put_object", Bucket=bucket, Key=key, Body=data, IfNoneMatch="*"
                )
            except (FileExistsError, OSError) as exc:
                if _precondition_failed(exc):
                    return None
                raise
            return put["ETag"]
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        tmp = f"{self.path}.{uuid.uuid4().hex}"
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, self.path)  # fails if the name exists: exclusive, and never torn
        except FileExistsError:
            return None
        finally:
            os.unlink(tmp)
        return data.decode()

    def replace(self, holder: Holder, version: str) -> str | None:
        """Overwrite the lock only if it is still at ``version``; the new version, or
        None if it changed (another run took it over, or it is gone)."""
        data = json.dumps(holder.__dict__).encode()
        if self.s3:
            bucket, key, _ = self.fs.split_path(self.path)
            try:
                put = self.fs.call_s3(
                    "put_object", Bucket=bucket, Key=key, Body=data, IfMatch=version
                )
            except (FileNotFoundError, OSError) as exc:
                if isinstance(exc, FileNotFoundError) or _precondition_failed(exc):
                    return None
                raise
            return put["ETag"]
        current = self.read()
        if current is None or current[1] != version:
            return None
        tmp = f"{self.path}.{uuid.uuid4().hex}"
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, self.path)
        return data.decode()

    def take_stale(self, version: str) -> bool:
        """Remove a stale lock, if it is still the one judged stale (of runs that race
        to do so, one succeeds)."""
        if self.s3:
            # Claim it with a conditional overwrite first: only one run's If-Match on the
            # stale ETag succeeds; that run then removes it and creates its own.
            bucket, key, _ = self.fs.split_path(self.path)
            try:
                self.fs.call_s3(
                    "put_object", Bucket=bucket, Key=key, Body=b"taken over", IfMatch=version
                )
            except (FileNotFoundError, OSError) as exc:
                if isinstance(exc, FileNotFoundError) or _precondition_failed(exc):
                    return False
                raise
            self.fs.rm_file(self.path)
            return True
        aside = f"{self.path}.stale-{uuid.uuid4().hex}"
        try:
            os.rename(self.path, aside)  # atomic: of racing runs, one moves it
        except FileNotFoundError:
            return False
        with open(aside, "rb") as fh:
            moved = fh.read().decode(errors="replace")
        if moved != version:  # a fresh lock, created since it was judged: put it back
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.path)
            os.unlink(aside)
            return False
        os.unlink(aside)
        return True

    def remove(self, version: str) -> None:
        current = self.read()
        if current is not None and current[1] == version:
            if self.s3:
                self.fs.rm_file(self.path)
            else:
                os.unlink(self.path)


def _precondition_failed(exc: BaseException) -> bool:
    text = f"{exc} {getattr(exc, '__cause__', '')}"
    return "PreconditionFailed" in text or "412" in text or "ConditionalRequestConflict" in text


class Lease:
    """A held lease: renewed by a background thread until released."""

    def __init__(self, store: _Store, holder: Holder, version: str, timeout: float):
        self.store, self.holder, self.version = store, holder, version
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._renew, args=(timeout / RENEWALS_PER_TIMEOUT,), daemon=True
        )
        self._thread.start()

    def _renew(self, every: float) -> None:
        while not self._stop.wait(every):
            holder = Holder(**{**self.holder.__dict__, "heartbeat": _now().isoformat()})
            try:
                version = self.store.replace(holder, self.version)
            except OSError:
                continue  # the store is briefly unreachable: try again at the next beat
            if version is None:
                self.lost = "its lease on OUT was taken over by another run"
                return
            self.holder, self.version = holder, version

    def check(self) -> None:
        """Raise if another run took the lease over (before committing anything)."""
        if self.lost:
            raise MeddxError(f"run {self.holder.run_id} stopped: {self.lost}; nothing committed")

    def release(self) -> None:
        self._stop.set()
        self._thread.join()
        if not self.lost:
            with contextlib.suppress(OSError):
                self.store.remove(self.version)


def _gone_from_here(holder: Holder) -> bool:
    """Whether the holder ran on this host and its process no longer exists: a run
    killed here is taken over at once, without waiting out the timeout."""
    if holder.host != socket.gethostname():
        return False
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    return False


@contextlib.contextmanager
def _uninterrupted():
    """Hold SIGINT and SIGTERM back for the block and deliver them after it: a lock
    created by the block is then always in the hands of the code that releases it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    kept = {
        sig: signal.signal(sig, lambda signum, frame: caught.append(signum))
        for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield
    finally:
        for sig, handler in kept.items():
            signal.signal(sig, handler)
        for sig in caught:
            signal.raise_signal(sig)


def acquire(
    out: str,
    settings: StorageSettings,
    run_id: str,
    command: str,
    wait: float = 0.0,
    timeout: float = DEFAULT_LOCK_TIMEOUT,
    into: list[Lease] | None = None,
) -> Lease:
    """Take the lease on OUT, waiting up to ``wait`` seconds for its holder; a lease
    silent for ``timeout`` seconds is taken over. Raises MeddxBusy naming the holder.
    The lease is also appended to ``into`` before any signal can interrupt, so that a
    caller's ``finally`` can release a lease whose ``acquire`` a signal cut short."""
    store = _Store(out, settings)
    deadline = time.monotonic() + wait
    while True:
        started = _now().isoformat()
        me = Holder(run_id, socket.gethostname(), os.getpid(), command, started, started)
        with _uninterrupted():
            version = store.create(me)
            if version is not None:
                lease = Lease(store, me, version, timeout)
                if into is not None:
                    into.append(lease)
        if version is not None:
            return lease
        current = store.read()
        if current is None:
            continue  # released between our try and our look: try again
        holder, tag, file_age = current
        age = holder.age if holder else file_age
        gone = holder is not None and _gone_from_here(holder)
        if age > timeout or gone:
            if store.take_stale(tag):
                who = holder.run_id if holder else "an unreadable lock"
                why = f"its pid {holder.pid} on this host is gone" if gone else ""
                print(
                    f"meddx: took over the lease on {out} from {who}, "
                    + (why or f"silent for {age:.0f} s"),
                    file=sys.stderr,
                )
            continue
        if time.monotonic() >= deadline:
            who = holder.describe() if holder else f"an unreadable lock ({age:.0f} s old)"
            raise MeddxBusy(f"{out} is being written by {who}; nothing was scored")
        time.sleep(min(POLL_SECONDS, max(0.1, deadline - time.monotonic())))


@contextlib.contextmanager
def held(
    out: str, settings: StorageSettings, run_id: str, command: str, wait: float, timeout: float
):
    """The lease for the duration of a run, released on every way out (success, error,
    alarm, Ctrl-C, SIGTERM), including a signal that arrives as the lock is created."""
    taken: list[Lease] = []
    try:
        yield acquire(out, settings, run_id, command, wait, timeout, into=taken)
    finally:
        for lease in taken:
            lease.release()
