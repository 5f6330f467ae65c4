"""A real HTTP server on 127.0.0.1 for download tests, with faults on demand.

Per path it can refuse or honour ``Range``, answer 5xx a number of times first, drop the
connection after N bytes (once, optionally replacing the file right then), stall for a while
(once), or redirect. It sends a strong ``ETag`` and a ``Last-Modified`` and honours
``If-None-Match`` (304) and ``If-Range`` (a stale validator gets the whole new file), as
RFC 9110 describes. Every request is recorded (path, Range and conditional headers, status,
body bytes sent) so tests can count what was served.
"""

from __future__ import annotations

import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Resource:
    body: bytes
    ranges: bool = True
    fail_first: int = 0
    drop_after: int | None = None
    stall_after: int | None = None
    stall_seconds: float = 0.0
    redirect: str | None = None
    status: int = 200
    #: After the dropped connection, serve this body instead (the file changed upstream).
    replace_after_drop: bytes | None = None
    last_modified: str = "Sat, 21 Nov 2026 00:00:00 GMT"

    @property
    def etag(self) -> str:
        return f'"{len(self.body):x}-{zlib.crc32(self.body):08x}"'


@dataclass
class Hit:
    path: str
    range: str | None
    status: int
    sent: int
    if_none_match: str | None = None
    if_range: str | None = None


@dataclass
class Server:
    port: int = 0
    resources: dict[str, Resource] = field(default_factory=dict)
    hits: list[Hit] = field(default_factory=list)
    #: (path, Range header) of every request as it arrives, before it is answered.
    starts: list[tuple[str, str | None]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    idle: threading.Condition = field(default_factory=threading.Condition)
    in_flight: int = 0

    def wait_idle(self, timeout: float = 10.0) -> list[Hit]:
        """Wait until every request has been answered and recorded; return the hits.

        A client can finish reading before the handler thread records the request, so
        tests look at ``hits`` only through this."""
        with self.idle:
            if not self.idle.wait_for(lambda: self.in_flight == 0, timeout):
                raise AssertionError("HTTP test server still busy")
        return list(self.hits)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def bytes_served(self, path: str) -> int:
        return sum(h.sent for h in self.hits if h.path == path)


def _handler(server: Server) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:  # keep test output clean
            pass

        def do_GET(self) -> None:
            with server.idle:
                server.in_flight += 1
            try:
                self._get()
            finally:
                with server.idle:
                    server.in_flight -= 1
                    server.idle.notify_all()

        def _get(self) -> None:
            res = server.resources.get(self.path)
            rng = self.headers.get("Range")
            with server.lock:
                server.starts.append((self.path, rng))
            if res is None:
                return self._plain(404, rng)
            if res.redirect:
                self.send_response(302)
                self.send_header("Location", res.redirect)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return self._record(302, rng, 0)
            with server.lock:
                failing = res.fail_first > 0
                if failing:
                    res.fail_first -= 1
            if failing:
                return self._plain(500, rng)
            if res.status != 200:
                return self._plain(res.status, rng)
            etag = res.etag
            if self.headers.get("If-None-Match") == etag:
                return self._plain(304, rng)
            if_range = self.headers.get("If-Range")
            fresh = if_range is None or if_range in (etag, res.last_modified)
            start = 0
            if rng and fresh and res.ranges and rng.startswith("bytes=") and rng.endswith("-"):
                start = int(rng[len("bytes=") : -1])
                if start >= len(res.body):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(res.body)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return self._record(416, rng, 0)
                self.send_response(206)
                self.send_header(
                    "Content-Range", f"bytes {start}-{len(res.body) - 1}/{len(res.body)}"
                )
            else:
                self.send_response(200)
            body = res.body[start:]
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Accept-Ranges", "bytes" if res.ranges else "none")
            self.send_header("ETag", etag)
            self.send_header("Last-Modified", res.last_modified)
            self.end_headers()
            sent = 0
            with server.lock:
                drop, res.drop_after = res.drop_after, None
                stall, res.stall_after = res.stall_after, None
            for i in range(0, len(body), 65536):
                piece = body[i : i + 65536]
                if drop is not None and sent + len(piece) > drop:
                    piece = piece[: drop - sent]
                    self.wfile.write(piece)
                    sent += len(piece)
                    self.wfile.flush()
                    self.close_connection = True
                    if res.replace_after_drop is not None:
                        res.body, res.replace_after_drop = res.replace_after_drop, None
                    return self._record(206 if start else 200, rng, sent)
                if stall is not None and sent >= stall:
                    self.wfile.flush()
                    time.sleep(res.stall_seconds)
                    stall = None
                try:
                    self.wfile.write(piece)
                except OSError:
                    return self._record(206 if start else 200, rng, sent)
                sent += len(piece)
            self._record(206 if start else 200, rng, sent)

        def _plain(self, status: int, rng: str | None) -> None:
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()
            self._record(status, rng, 0)

        def _record(self, status: int, rng: str | None, sent: int) -> None:
            hit = Hit(
                self.path,
                rng,
                status,
                sent,
                self.headers.get("If-None-Match"),
                self.headers.get("If-Range"),
            )
            with server.lock:
                server.hits.append(hit)

    return Handler


@contextmanager
def serve(port: int = 0, state: Server | None = None) -> Iterator[Server]:
    """Run a server on 127.0.0.1 for the duration of the block: on a free port, or again on
    ``port`` with an earlier block's ``state`` (its resources and records), so that a test
    can take the server down and bring it back."""
    state = state or Server()
    httpd = ThreadingHTTPServer(("127.0.0.1", port), _handler(state))
    httpd.daemon_threads = True
    state.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)
