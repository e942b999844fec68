"""The live page's server: ``GET /`` the page (self-contained, like the explorer's); a JSON
request answered by :meth:`tlextract.report.live.Live.generate`, either streamed (``POST
/api/stream``: NDJSON, one event a line as each token is scored, then ``{"event": "done",
...answers}``; what the page uses) or whole (``POST /api/generate``: one JSON reply, for scripts).

Replies: 200 with the answers; 400 ``{"error": ...}`` for bad input; 409 while another answer
is being generated (one at a time: the request is refused, never queued); 500 with one line for
a bug (``{"event": "error", ...}`` once a stream has begun); 404 for any other path. A page that
leaves mid-stream stops its generation. The server listens on the host it is given only
(127.0.0.1 by default).
"""

from __future__ import annotations

import json
import logging
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tlextract.errors import TLExtractError
from tlextract.report.explorer_page import render
from tlextract.report.live import Busy, Live

log = logging.getLogger(__name__)
MAX_BODY = 64_000  # bytes: a prompt at its longest is far less


class _Handler(BaseHTTPRequestHandler):
    server: LiveServer

    def do_GET(self) -> None:
        if self.path.split("?")[0] != "/":
            self._reply(HTTPStatus.NOT_FOUND, {"error": f"no page at {self.path}"})
            return
        body = self.server.page.encode("utf-8")
        self._send(HTTPStatus.OK, body, "text/html; charset=utf-8")

    def do_POST(self) -> None:
        if self.path not in ("/api/generate", "/api/stream"):
            self._reply(HTTPStatus.NOT_FOUND, {"error": f"no endpoint at {self.path}"})
            return
        try:
            if self.path == "/api/stream":
                self._stream(self._json())
            else:
                self._reply(HTTPStatus.OK, self.server.live.generate(self._json()))
        except Busy as e:
            self._reply(HTTPStatus.CONFLICT, {"error": str(e)})
        except TLExtractError as e:
            self._reply(HTTPStatus.BAD_REQUEST, {"error": str(e)})
        except Exception as e:
            self._reply(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": _bug(e)})

    def _stream(self, request: Any) -> None:
        """Answer as NDJSON, one event a line as it happens; the status line waits for the
        first event, so bad input and a busy model still get their 400 or 409."""
        started = False

        def emit(event: dict[str, Any]) -> None:
            nonlocal started
            if not started:
                self.send_response(HTTPStatus.OK)
                self.send_header("Content-Type", "application/x-ndjson")
                self.send_header("Cache-Control", "no-store")
                self.end_headers()  # no length: the answer ends when the connection closes
                started = True
            self.wfile.write(json.dumps(event).encode("utf-8") + b"\n")

        try:
            answers = self.server.live.generate(request, emit)
        except (BrokenPipeError, ConnectionResetError):
            log.info("live: the page left before its answer was done; generation stopped")
            return
        except Exception as e:
            if not started:
                raise
            emit({"event": "error", "error": str(e) if isinstance(e, TLExtractError) else _bug(e)})
            return
        emit({"event": "done", **answers})

    def _json(self) -> Any:
        given = self.headers.get("Content-Length") or "0"
        if not given.isdigit():
            raise TLExtractError(f"Content-Length {given!r} is not a byte count.")
        length = int(given)
        if length > MAX_BODY:
            raise TLExtractError(f"the request has {length} bytes; at most {MAX_BODY}.")
        try:
            return json.loads(self.rfile.read(length) or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TLExtractError(f"the request is not JSON: {e}") from e

    def _reply(self, status: HTTPStatus, data: Any) -> None:
        self._send(status, json.dumps(data).encode("utf-8"), "application/json")

    def _send(self, status: HTTPStatus, body: bytes, kind: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base's name)
        log.debug("live: " + format, *args)


def _bug(e: Exception) -> str:
    """A bug's one line for the page; the log has the traceback."""
    log.error("live: the request failed", exc_info=e)
    return f"a bug in tlextract: {e!r}"


class LiveServer(ThreadingHTTPServer):
    """A threading HTTP server holding the :class:`Live` model and the rendered page."""

    daemon_threads = True  # a request still running does not keep Ctrl-C waiting

    def __init__(self, live: Live, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__((host, port), _Handler)
        self.live = live
        self.page = render("live_template.html", live.page_data())

    @property
    def url(self) -> str:
        host, port = self.socket.getsockname()[:2]  # the port chosen when asked for 0
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{port}/"


def serve(live: Live, host: str, port: int) -> None:
    """Serve until Ctrl-C, then stop with one line."""
    try:
        server = LiveServer(live, host, port)
    except OSError as e:
        raise TLExtractError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e
    with server:
        print(f"live page: {server.url} (Ctrl-C stops it)", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            print("live page: stopped", flush=True)
