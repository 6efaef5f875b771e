"""A local S3 endpoint: moto's S3 server as a child process on a free loopback port.

``meddx demo`` runs its whole path against one, and so do the tests and benchmarks (as
s3fs's own suite does): a real S3 HTTP endpoint, which Ray's worker processes reach like
any store. Imports nothing heavy, and moto only in the child process.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

from meddx import MeddxError

LOOPBACK = "127.0.0.1"
# moto takes credentials of any value; set where none are, before Ray starts its workers
# (they inherit the environment).
DUMMY_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "meddx-demo",
    "AWS_SECRET_ACCESS_KEY": "meddx-demo",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    """A TCP port free on loopback now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def terminate(proc: subprocess.Popen, timeout: float) -> None:
    """Stop a child server by its own pid: SIGTERM, then SIGKILL after ``timeout`` s."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1):
            return True
    except urllib.error.HTTPError:  # an S3 error document is an answer too
        return True
    except OSError:  # refused, reset, timed out: not listening yet
        return False


@contextmanager
def s3_server(timeout: float = 30) -> Iterator[str]:
    """moto's S3 server on a free loopback port for the ``with`` block; yields its URL.
    Where no AWS credentials are set, DUMMY_CREDENTIALS are (and stay set)."""
    if importlib.util.find_spec("moto") is None:
        raise MeddxError(
            "a local S3 endpoint runs moto's server: "
            "pip install 'meddx[demo]' (make demo installs it)"
        )
    for key, value in DUMMY_CREDENTIALS.items():
        os.environ.setdefault(key, value)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", LOOPBACK, "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://{LOOPBACK}:{port}"
    deadline = time.monotonic() + timeout
    while not _answers(url):
        if time.monotonic() > deadline or proc.poll() is not None:
            terminate(proc, timeout=5)
            raise MeddxError(f"moto's S3 server did not start on {url}")
        time.sleep(0.1)
    try:
        yield url
    finally:
        terminate(proc, timeout=10)
