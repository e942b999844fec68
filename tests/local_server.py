"""Loopback HTTP servers for the tests: the loop the fake servers run, and the test side that starts
one as a process and talks to it. Standard library only (the servers import it too)."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def serve(handler: type[BaseHTTPRequestHandler], queue: int = 5) -> None:
    """Serve on 127.0.0.1 (a free port, printed as ``PORT <n>``) until killed."""
    ThreadingHTTPServer.daemon_threads = True
    ThreadingHTTPServer.request_queue_size = queue
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    print(f"PORT {server.server_address[1]}", flush=True)
    try:
        server.serve_forever(poll_interval=0.05)
    except KeyboardInterrupt:
        pass
    sys.exit(0)


@contextmanager
def started(script: Path, *args: str, env: dict[str, str]) -> Iterator[str]:
    """The server ``script`` running in a process; yields its base URL."""
    proc = subprocess.Popen(
        [sys.executable, str(script), *args], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        assert line.startswith("PORT "), f"server did not start: {line!r}"
        yield f"http://127.0.0.1:{int(line.split()[1])}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def control(base: str, path: str) -> dict:
    """GET ``/stats`` or POST ``/reset`` on a fake OpenAI server, bypassing any proxy."""
    method = "POST" if path == "/reset" else "GET"
    data = b"{}" if method == "POST" else None
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(urllib.request.Request(base + path, data=data, method=method), timeout=5) as r:
        return json.loads(r.read())


def use(base: str, monkeypatch, key_env: str, secret: str) -> str:
    """``base`` reset, with ``secret`` in ``key_env`` and no proxy for the loopback address."""
    monkeypatch.setenv(key_env, secret)
    for var in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(var, "127.0.0.1,localhost")
    control(base, "/reset")
    return base
