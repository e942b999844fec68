"""A loopback stand-in for the Hugging Face Hub's model file endpoints, for tests/test_hub.py.

Run as ``python fake_hub_server.py REPO=DIR ... [--gated REPO=DIR ...]``: it listens on 127.0.0.1
(a free port), prints ``PORT <n>`` on stdout, and serves until killed. Standard library only.

Each repo serves the files of its DIR at one fixed commit, the way huggingface_hub 2.4's
``snapshot_download`` asks for them:

* ``GET /api/models/{repo}`` and ``/api/models/{repo}/revision/{rev}``: the model info (``sha``).
* ``GET /api/models/{repo}/tree/{rev}``: the file list (weights as LFS entries with a sha256).
* ``HEAD`` and ``GET /{repo}/resolve/{rev}/{path}``: the file, with ``X-Repo-Commit`` and
  ``ETag`` (LFS files also ``X-Linked-Etag`` and ``X-Linked-Size``, as the hub sends them).

``rev`` is ``main`` or the commit. Gated repos answer 401 with ``X-Error-Code: GatedRepo`` to a
request without a token; a token other than ``$FAKE_HUB_TOKEN`` gets 401 "Invalid credentials in
Authorization header" everywhere; unknown repos answer 404 with ``X-Error-Code: RepoNotFound``,
missing files 404 with ``EntryNotFound``.
``GET /_requests`` returns the requests so far as ``"METHOD /path"`` strings; ``POST /_reset``
forgets them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import unquote, urlsplit

from local_server import serve

LFS_SUFFIXES = (".safetensors", ".bin")
API = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/(?P<kind>revision|tree)/(?P<rev>[^/]+))?$")
RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")


@dataclass(frozen=True)
class Repo:
    files: dict[str, bytes]
    commit: str
    gated: bool

    def etag(self, path: str) -> str:
        data = self.files[path]
        if path.endswith(LFS_SUFFIXES):  # LFS files: the sha256 of the content
            return hashlib.sha256(data).hexdigest()
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # the git blob id

    def tree_entry(self, path: str) -> dict:
        data = self.files[path]
        entry = {"type": "file", "path": path, "size": len(data), "oid": self.etag(path)}
        if path.endswith(LFS_SUFFIXES):
            entry["lfs"] = {"oid": self.etag(path), "size": len(data), "pointerSize": 134}
        return entry


def load_repo(repo_id: str, directory: Path, gated: bool) -> Repo:
    files = {
        p.relative_to(directory).as_posix(): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }
    return Repo(files, hashlib.sha1(repo_id.encode()).hexdigest(), gated)


repos: dict[str, Repo] = {}
lock = threading.Lock()
requests: list[str] = []


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def reply(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def reply_json(self, status: int, body: object, headers: dict[str, str] | None = None) -> None:
        json_headers = {"Content-Type": "application/json", **(headers or {})}
        self.reply(status, json.dumps(body).encode(), json_headers)

    def refuse(self, status: int, code: str | None, message: str) -> None:
        headers = {"X-Error-Message": message} | ({"X-Error-Code": code} if code else {})
        self.reply_json(status, {"error": message}, headers)

    def do_POST(self) -> None:
        if self.path == "/_reset":
            with lock:
                requests.clear()
        self.reply_json(200, {"ok": True})

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        path = unquote(urlsplit(self.path).path)
        if path == "/_requests":
            with lock:
                self.reply_json(200, list(requests))
            return
        with lock:
            requests.append(f"{self.command} {path}")
        match = API.match(path) or RESOLVE.match(path)
        repo = self.accessible(match["repo"] if match else None)
        if match is None or repo is None:
            return
        if match["rev"] not in (None, "main", repo.commit):
            self.refuse(404, "RevisionNotFound", f"Invalid rev id: {match['rev']}")
        elif "path" in match.groupdict():
            self.send_file(repo, match["path"])
        elif match["kind"] == "tree":
            self.reply_json(200, [repo.tree_entry(p) for p in repo.files])
        else:
            siblings = [{"rfilename": p} for p in repo.files]
            info = {"id": match["repo"], "sha": repo.commit, "siblings": siblings}
            self.reply_json(200, {**info, "private": False, "gated": repo.gated and "manual"})

    def accessible(self, repo_id: str | None) -> Repo | None:
        """The repo, or None after answering as the hub does when it is missing or gated."""
        repo = repos.get(repo_id or "")
        if repo is None:
            self.refuse(404, "RepoNotFound", "Repository not found")
            return None
        token = os.environ.get("FAKE_HUB_TOKEN")
        auth = self.headers.get("Authorization")
        if auth is not None and auth != f"Bearer {token}":
            self.refuse(401, None, "Invalid credentials in Authorization header")
            return None
        if repo.gated and auth is None:
            self.refuse(401, "GatedRepo", f"Access to model {repo_id} is restricted.")
            return None
        return repo

    def send_file(self, repo: Repo, path: str) -> None:
        if path not in repo.files:
            self.refuse(404, "EntryNotFound", f"{path} does not exist on main")
            return
        etag, size = repo.etag(path), len(repo.files[path])
        headers = {"X-Repo-Commit": repo.commit, "ETag": f'"{etag}"'}
        if path.endswith(LFS_SUFFIXES):
            headers |= {"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(size)}
        self.reply(200, repo.files[path], headers)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("repos", nargs="*", metavar="REPO=DIR")
    parser.add_argument("--gated", action="append", default=[], metavar="REPO=DIR")
    args = parser.parse_args()
    for spec, gated in [(s, False) for s in args.repos] + [(s, True) for s in args.gated]:
        repo_id, _, directory = spec.partition("=")
        repos[repo_id] = load_repo(repo_id, Path(directory), gated)
    serve(Handler)


if __name__ == "__main__":
    main()
