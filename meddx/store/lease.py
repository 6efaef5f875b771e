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
killed process renews nothing); so does one whose holder's pid no longer exists in the
reader's own PID namespace. That shortcut needs the namespace to be known to be the same:
the lock records the holder's host name, kernel boot id and ``/proc/self/ns/pid`` inode,
and only a reader with all three equal asks the kernel about the pid (containers with
host networking share the host name, not the pids). Otherwise the staleness rule alone
decides. The next run takes a stale lease over with the same conditional write against
the stale ETag (S3) or a compare-and-remove under the guard (local), so two runs that
find the same stale lease cannot both take it, and then recovers the dead run's staging
as every run does. Heartbeats compare the holder's clock with the reader's: the hosts
must keep time (NTP), as they must for the run dates anyway.

On a local file system every read-compare-write of the lock (renew, take over, release)
holds ``flock(2)`` on ``OUT/_LOCK.guard``, so it is one step for all meddx processes
there; creating needs no guard, since ``link(2)`` fails while the lock exists.

The lease fences the commit: :meth:`Lease.check` renews it synchronously and
conditionally (If-Match on S3, the compare under the guard on disk) just before a run
writes its ``_COMMIT`` plan, and raises unless that renewal succeeds. A run whose lease
was taken over, or whose store cannot be reached, therefore never commits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import fcntl
import json
import logging
import os
import posixpath
import signal
import socket
import threading
import time
import uuid
from dataclasses import dataclass

from meddx import MeddxBusy, MeddxError, one_line
from meddx.inputs import storage
from meddx.inputs.storage import StorageSettings
from meddx.names import DEFAULT_LOCK_TIMEOUT

log = logging.getLogger(__name__)

LOCK = "_LOCK"
GUARD = "_LOCK.guard"  # local only: flock(2) on it makes read-compare-write one step
RENEWALS_PER_TIMEOUT = 5  # a holder renews this often within one timeout
POLL_SECONDS = 2.0  # how often a waiting run looks at the lease again
# The guard is held for one read and one rename; a holder that keeps it this long is
# stopped or hung, and the caller gets an error rather than hanging with it.
GUARD_WAIT_SECONDS = 10.0
PID_NS = "/proc/self/ns/pid"
BOOT_ID = "/proc/sys/kernel/random/boot_id"


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
    # Which kernel (boot id) and PID namespace (nsfs inode) ``pid`` belongs to; empty
    # where the holder could not tell, and in locks written before they were recorded.
    boot_id: str = ""
    pid_ns: str = ""

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
        self.guard = posixpath.join(storage.strip_scheme(out), GUARD)

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
        tmp = f"{self.path}.{uuid.uuid4().hex}"
        with open(tmp, "wb") as fh:
            fh.write(data)
        try:
            with self._guarded():
                current = self.read()
                if current is None or current[1] != version:
                    return None
                os.replace(tmp, self.path)  # atomic: a reader sees the old or the new lock
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
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
        with self._guarded():
            current = self.read()
            if current is None or current[1] != version:
                return False  # renewed or taken over since it was judged
            os.unlink(self.path)
            return True

    def remove(self, version: str) -> None:
        if self.s3:
            current = self.read()
            if current is not None and current[1] == version:
                self.fs.rm_file(self.path)
            return
        with self._guarded():
            current = self.read()
            if current is not None and current[1] == version:
                os.unlink(self.path)

    @contextlib.contextmanager
    def _guarded(self):
        """Hold the local guard for the block. flock(2) excludes other processes and
        other threads of this one alike (each call opens its own file description), and
        the kernel drops it with a process that dies, so it can never be left behind."""
        fd = os.open(self.guard, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            deadline = time.monotonic() + GUARD_WAIT_SECONDS
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        wait = f"{GUARD_WAIT_SECONDS:.0f} s"
                        raise TimeoutError(f"{self.guard} held for over {wait}") from None
                    time.sleep(0.01)
            yield
        finally:
            os.close(fd)  # releases the flock


def _precondition_failed(exc: BaseException) -> bool:
    text = f"{exc} {getattr(exc, '__cause__', '')}"
    return "PreconditionFailed" in text or "412" in text or "ConditionalRequestConflict" in text


class Lease:
    """A held lease: renewed by a background thread until released, and synchronously by
    :meth:`check`, the fence before a commit."""

    def __init__(self, store: _Store, holder: Holder, version: str, timeout: float):
        self.store, self.holder, self.version = store, holder, version
        self.lost: str | None = None
        # One renewal at a time: the background beat and check() each compare against
        # the version the other may be replacing, and would take each other for a thief.
        self._renewing = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._beat, args=(timeout / RENEWALS_PER_TIMEOUT,), daemon=True
        )
        self._thread.start()

    def _stopped(self) -> str:
        return f"run {self.holder.run_id} stopped: {self.lost}; nothing committed"

    def renew(self) -> None:
        """Write a new heartbeat, conditionally on the version this run last wrote.
        Raises MeddxError (and the lease is lost for good) if the lock changed: another
        run took it over, or it is gone. OSError: the store could not be reached."""
        with self._renewing:
            if self.lost:
                raise MeddxError(self._stopped())
            holder = dataclasses.replace(self.holder, heartbeat=_now().isoformat())
            version = self.store.replace(holder, self.version)
            if version is None:
                self.lost = "its lease on OUT was taken over by another run"
                raise MeddxError(self._stopped())
            self.holder, self.version = holder, version

    def _beat(self, every: float) -> None:
        failing = False
        while not self._stop.wait(every):
            try:
                self.renew()
            except MeddxError:
                return  # lost: check() says so before anything is committed
            except OSError as exc:
                # The store is briefly unreachable: try again at the next beat. check()
                # renews for itself, so a run never commits on an unrenewed lease.
                if not failing:
                    log.warning(
                        "meddx: could not renew the lease on OUT (%s); retrying every %.0f s",
                        one_line(exc, 160),
                        every,
                    )
                failing = True
                continue
            if failing:
                log.warning("meddx: renewed the lease on OUT again")
            failing = False

    def check(self) -> None:
        """Renew the lease now and raise MeddxError unless that succeeds: the fence a run
        passes just before it writes its commit plan. A lease taken over, gone, or not
        renewable because the store cannot be reached all refuse the commit."""
        try:
            self.renew()
        except OSError as exc:
            raise MeddxError(
                f"run {self.holder.run_id} stopped: could not renew its lease on OUT "
                f"({one_line(exc, 160)}); nothing committed"
            ) from exc

    def release(self) -> None:
        self._stop.set()
        self._thread.join()
        if not self.lost:
            with contextlib.suppress(OSError):
                self.store.remove(self.version)


def _pid_namespace() -> tuple[str, str]:
    """This process's kernel (boot id) and PID namespace (the inode of
    ``/proc/self/ns/pid``); empty strings where /proc does not say."""
    try:
        with open(BOOT_ID) as fh:
            boot_id = fh.read().strip()
        pid_ns = str(os.stat(PID_NS).st_ino)
    except OSError:
        return "", ""
    return boot_id, pid_ns


def _gone_from_here(holder: Holder) -> bool:
    """Whether the holder's process is known to no longer exist: a run killed here is
    taken over at once, without waiting out the timeout. Only where its pid is known to
    be one of our PID namespace (same host name, kernel boot and namespace inode): a
    container with host networking has the host's name but pids of its own."""
    boot_id, pid_ns = _pid_namespace()
    if not (boot_id and pid_ns and holder.boot_id and holder.pid_ns):
        return False  # unknown: the staleness rule decides
    if (holder.host, holder.boot_id, holder.pid_ns) != (socket.gethostname(), boot_id, pid_ns):
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
        me = Holder(
            run_id, socket.gethostname(), os.getpid(), command, started, started, *_pid_namespace()
        )
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
                log.warning(
                    "meddx: took over the lease on %s from %s, %s",
                    out,
                    who,
                    why or f"silent for {age:.0f} s",
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
