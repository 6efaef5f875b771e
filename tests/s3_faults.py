"""A fault-injecting HTTP proxy in front of a real S3 endpoint (moto's server), for tests.

Object stores fail in a few typical ways: 503 SlowDown when throttling, 500
InternalError, a connection dropped before any answer, a connection dropped half way
through a body, and 403 AccessDenied that no retry will cure. The proxy forwards every
request to the upstream endpoint and injects those faults by rule, so clients (s3fs in
Ray workers, other processes) meet them over real HTTP on loopback.

Rules count requests per (method, object or listing): a rule's faults hit the first
requests of each method for every matching key, in order, then requests pass. Denied keys
answer 403 every time. Everything injected is counted in ``injected``.
"""

from __future__ import annotations

import http.client
import socket
import ssl
import struct
import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

# The S3 error documents for the faults, as AWS sends them.
ERRORS = {
    "503": (503, "SlowDown", "Please reduce your request rate."),
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
    "403": (403, "AccessDenied", "Access Denied"),
}
# Faults that close the connection: before any answer, or half way through the body.
DROPS = ("reset", "truncate")
# Hop-by-hop headers a proxy must not forward.
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "expect",
}


@dataclass
class FaultRules:
    """What to inject. Keys are matched by substring of ``bucket/key`` (listings:
    ``bucket?list=PREFIX``); the first matching rule wins."""

    transient: dict[str, list[str]] = field(default_factory=dict)
    denied: tuple[str, ...] = ()
    # Faults for the first requests of every key no other rule matches.
    default: list[str] = field(default_factory=list)


def request_key(method: str, target: str) -> str:
    """``bucket/key`` of an object request, ``bucket?list=PREFIX`` of a listing."""
    parts = urlsplit(target)
    path = parts.path.lstrip("/")
    query = parse_qs(parts.query, keep_blank_values=True)
    bucket_only = "/" not in path.rstrip("/")
    if method == "GET" and bucket_only and ("list-type" in query or "prefix" in query):
        return f"{path.rstrip('/')}?list={query.get('prefix', [''])[0]}"
    return path


class FaultyS3Proxy:
    """Forwards to ``upstream`` and injects faults by ``rules``; ``url`` is its endpoint."""

    def __init__(self, upstream: str, rules: FaultRules | None = None, tls=None):
        """``tls``: (certificate, key) files to serve HTTPS with (Python's ssl)."""
        up = urlsplit(upstream)
        self.upstream = (up.hostname, up.port)
        self.rules = rules or FaultRules()
        self.injected: Counter[str] = Counter()
        self.log: list[tuple[str, str, str]] = []  # (method, key, fault) for each fault
        self._seen: Counter[tuple[str, str]] = Counter()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.proxy = self
        scheme = "http"
        if tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*map(str, tls))
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
            scheme = "https"
        self.url = f"{scheme}://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> FaultyS3Proxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def fault_for(self, method: str, target: str) -> str | None:
        key = request_key(method, target)
        with self._lock:
            n = self._seen[(method, key)]
            self._seen[(method, key)] += 1
            fault = None
            if any(d in key for d in self.rules.denied):
                fault = "403"
            else:
                rule = next(
                    (faults for pattern, faults in self.rules.transient.items() if pattern in key),
                    self.rules.default,
                )
                fault = rule[n] if n < len(rule) else None
            if fault:
                self.injected[fault] += 1
                self.log.append((method, key, fault))
            return fault

    def forward(self, method: str, target: str, headers, body: bytes):
        conn = http.client.HTTPConnection(*self.upstream, timeout=60)
        try:
            sent = {k: v for k, v in headers.items() if k.lower() not in HOP_BY_HOP}
            if body or method in ("PUT", "POST"):
                sent["Content-Length"] = str(len(body))
            conn.request(method, target, body=body or None, headers=sent)
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, resp.getheaders(), data
        finally:
            conn.close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect

    def log_message(self, *args) -> None:  # quiet: pytest shows failures, not traffic
        pass

    def do_GET(self) -> None:
        proxy: FaultyS3Proxy = self.server.proxy
        body = self._read_body()
        fault = proxy.fault_for(self.command, self.path)
        if fault == "reset" or (fault == "truncate" and self.command != "GET"):
            self._drop()
            return
        if fault in ERRORS:
            self._send_error(*ERRORS[fault])
            return
        status, headers, data = proxy.forward(self.command, self.path, self.headers, body)
        if fault == "truncate" and len(data) < 2:
            self._drop()
            return
        self.send_response(status)
        for name, value in headers:
            if name.lower() not in HOP_BY_HOP | {"content-length", "server", "date"}:
                self.send_header(name, value)
        length = next((v for k, v in headers if k.lower() == "content-length"), None)
        self.send_header("Content-Length", length if self.command == "HEAD" else str(len(data)))
        self.end_headers()
        if self.command == "HEAD":
            return
        if fault == "truncate":
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self._drop()
            return
        self.wfile.write(data)

    do_HEAD = do_PUT = do_POST = do_DELETE = do_GET

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send_error(self, status: int, code: str, message: str) -> None:
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code><Message>{message}</Message>"
            "<RequestId>faulty-proxy</RequestId></Error>"
        ).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", "0" if self.command == "HEAD" else str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _drop(self) -> None:
        """Close the connection with a TCP reset: no answer, or no more of it."""
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
