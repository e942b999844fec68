"""A scripted OpenAI-compatible chat-completions server for the HTTP judge tests.

Run as ``python fake_openai_server.py``: it listens on 127.0.0.1 (a free port), prints
``PORT <n>`` on stdout, and serves until killed. Standard library only.

``POST /chat/completions`` answers like OpenAI with ``logprobs.content[0].top_logprobs``. The
behaviour for a request is scripted by directives in the prompt text, ``[[name=value ...]]``:

* ``dist=40:0.5,60:0.25`` the top logprobs: token "40" with p=0.5, "60" with p=0.25 (the rest of
  the probability goes to the token "I"). Tokens may carry a leading space: ``dist= 4:0.5``.
* ``fail=429x2`` the first 2 attempts with this prompt get HTTP 429 (any status works).
* ``retry_after=0.3`` sent as a Retry-After header with those failures.
* ``sleep=1.5x1`` the first attempt sleeps 1.5 s before answering (``sleep=1.5``: every attempt).
* ``hold=0.2`` every attempt sleeps 0.2 s (to measure concurrency).
* ``status=500`` every attempt gets that status.
* ``nologprobs`` the answer has ``"logprobs": null``.
* ``malformed`` the answer is HTTP 200 with a body that is no chat completion.
* ``draft=a.json,b.json`` a drafting request (no logprobs expected): attempt k answers with the
  text of the k-th file as the assistant message (the last file for later attempts).

Requests whose ``Authorization`` is not ``Bearer $FAKE_OPENAI_KEY`` (when that variable is set) get
401 with a body that echoes the key they sent (as real servers partly do). A model other than
``$FAKE_OPENAI_MODEL`` (default ``judge-model``) gets 404.

``GET /stats`` returns ``{"requests", "in_flight", "max_in_flight", "attempts": {prompt: n},
"last_messages"}`` (the messages of the latest request, to check what a retry sent);
``POST /reset`` zeroes everything.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
import time
from http.server import BaseHTTPRequestHandler

from local_server import serve

EXPECTED_KEY = os.environ.get("FAKE_OPENAI_KEY")
EXPECTED_MODEL = os.environ.get("FAKE_OPENAI_MODEL", "judge-model")
DIRECTIVES = re.compile(r"\[\[(.*?)\]\]", re.S)

lock = threading.Lock()
state: dict = {
    "requests": 0,
    "in_flight": 0,
    "max_in_flight": 0,
    "attempts": {},
    "last_messages": [],
}


def reset() -> None:
    with lock:
        state.update(requests=0, in_flight=0, max_in_flight=0, attempts={}, last_messages=[])


def parse_directives(prompt: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for block in DIRECTIVES.findall(prompt):
        for item in block.split(";"):
            name, _, value = item.partition("=")
            if name.strip():
                out[name.strip()] = value
    return out


def draft_reply(model: str, files: str, attempt: int) -> dict:
    paths = files.split(",")
    with open(paths[min(attempt, len(paths)) - 1], encoding="utf-8") as f:
        content = f.read()
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
            }
        ],
    }


def completion(model: str, directives: dict[str, str]) -> dict:
    top = []
    mass = 0.0
    for part in filter(None, directives.get("dist", "").split(",")):
        token, _, p = part.rpartition(":")
        top.append({"token": token, "logprob": math.log(float(p)), "bytes": list(token.encode())})
        mass += float(p)
    rest = max(1e-9, 1.0 - mass)
    top.append({"token": "I", "logprob": math.log(rest), "bytes": [73]})
    top.sort(key=lambda t: -t["logprob"])
    logprobs = None
    if "nologprobs" not in directives:
        logprobs = {"content": [dict(top[0], top_logprobs=top)], "refusal": None}
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": top[0]["token"]},
                "logprobs": logprobs,
                "finish_reason": "length",
            }
        ],
    }


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def send_json(self, status: int, body: object, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.done()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout test)

    def do_GET(self) -> None:
        if self.path == "/stats":
            with lock:
                self.send_json(200, json.loads(json.dumps(state)))
        else:
            self.send_json(404, {"error": {"message": "no such endpoint"}})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        if self.path == "/reset":
            reset()
            self.send_json(200, {"ok": True})
            return
        if not self.path.endswith("/chat/completions"):
            self.send_json(404, {"error": {"message": f"unknown path {self.path}"}})
            return
        with lock:
            state["requests"] += 1
            state["in_flight"] += 1
            state["max_in_flight"] = max(state["max_in_flight"], state["in_flight"])
        self.in_flight = True
        try:
            self.answer(raw)
        finally:
            self.done()

    def done(self) -> None:
        """No longer in flight: called before the answer is sent, since the client may send its
        next request as soon as it has this one's answer."""
        if getattr(self, "in_flight", False):
            self.in_flight = False
            with lock:
                state["in_flight"] -= 1

    def answer(self, raw: bytes) -> None:
        body = json.loads(raw)
        prompt = body["messages"][0]["content"]
        with lock:
            attempt = state["attempts"].get(prompt, 0) + 1
            state["attempts"][prompt] = attempt
            state["last_messages"] = body["messages"]
        d = parse_directives(prompt)
        auth = self.headers.get("Authorization", "")
        if EXPECTED_KEY is not None and auth != f"Bearer {EXPECTED_KEY}":
            sent = auth.removeprefix("Bearer ")
            self.send_json(401, {"error": {"message": f"Incorrect API key provided: {sent}"}})
            return
        if body.get("model") != EXPECTED_MODEL:
            self.send_json(
                404, {"error": {"message": f"The model `{body.get('model')}` does not exist"}}
            )
            return
        if "draft" not in d and not (body.get("logprobs") is True and body.get("max_tokens") == 1):
            self.send_json(400, {"error": {"message": "expected logprobs=true and max_tokens=1"}})
            return
        if "hold" in d:
            time.sleep(float(d["hold"]))
        if "sleep" in d:
            seconds, _, times = d["sleep"].partition("x")
            if not times or attempt <= int(times):
                time.sleep(float(seconds))
        if "status" in d:
            self.send_json(int(d["status"]), {"error": {"message": "scripted status"}})
            return
        if "fail" in d:
            status, _, times = d["fail"].partition("x")
            if attempt <= int(times or 1):
                headers = {"Retry-After": d["retry_after"]} if "retry_after" in d else None
                self.send_json(int(status), {"error": {"message": "scripted failure"}}, headers)
                return
        if "draft" in d:
            self.send_json(200, draft_reply(body["model"], d["draft"], attempt))
            return
        if "malformed" in d:
            self.send_json(200, "not a chat completion")
            return
        self.send_json(200, completion(body["model"], d))


def main() -> None:
    serve(Handler, queue=64)


if __name__ == "__main__":
    main()
