"""One OpenAI-compatible ``POST {base_url}/chat/completions`` endpoint: the HTTP plumbing the
HTTP judge (:mod:`tlextract.judge.http`) and the trait drafter (:mod:`tlextract.judge.draft`)
share.

Errors:

* 429, 408, 409, 425, 5xx, timeouts and connection errors are transient: :meth:`ChatEndpoint.call`
  retries them with exponential backoff and jitter (``Retry-After`` is honoured, up to
  ``backoff_max``) and raises :class:`GaveUp` when every attempt failed. Failed attempts are
  counted per cause and said in one warning per cause (:class:`Failures`), not one per attempt.
* A response that cannot be read (not JSON, no choices) is :class:`Malformed`: not retried, the
  server would answer the same; the call gives up at once.
* 401/403, 404, a redirect and any other 4xx raise TLExtractError at once: they would fail every
  request the same way.

The API key is read from the environment variable named by ``api_key_env`` and only ever put in
the ``Authorization`` header: it is not stored on disk, in logs or in exception messages (server
error bodies are never shown for 401/403 and are scrubbed otherwise). Only the standard library is
used.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import logging
import math
import os
import random
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

from tlextract.config import ENDPOINT
from tlextract.errors import TLExtractError

__all__ = [
    "ChatEndpoint",
    "Failures",
    "GaveUp",
    "Malformed",
    "Retryable",
    "parse_retry_after",
    "public_url",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRY_STATUSES = frozenset({408, 409, 425, 429})
"""HTTP statuses retried besides every 5xx."""


class Retryable(Exception):
    """A transient failure: retry after ``retry_after`` seconds if given, else back off."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Malformed(Exception):
    """A response that cannot be read: the same request would get the same answer, so it is not
    retried."""


class GaveUp(Exception):
    """Every attempt failed transiently, a response could not be read, or the call was cancelled
    (the message says which)."""


class Failures:
    """Failed attempts counted by cause across calls (and threads), said once per cause in
    :meth:`report` instead of once per attempt."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, list[int]] = {}  # cause -> [failed attempts, calls given up]

    def add(self, cause: str, gave_up: bool) -> None:
        with self._lock:
            count = self._counts.setdefault(cause, [0, 0])
            count[0] += 1
            count[1] += gave_up

    def report(self, role: str, where: str) -> None:
        """One warning per cause, then forget them."""
        with self._lock:
            counts, self._counts = self._counts, {}
        for cause, (attempts, gave_up) in counts.items():
            outcome = f"{gave_up} requests gave up" if gave_up else "every request then succeeded"
            log.warning("%s requests to %s: %d failed attempts (%s); %s", role, where, attempts,
                        cause, outcome)  # fmt: skip


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Never follow redirects: a POST would become a GET and the Authorization header could be
    sent to another host. A 3xx surfaces as an HTTPError instead."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date), or None."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when is None:
            return None
        seconds = when.timestamp() - time.time()
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


def public_url(url: str) -> str:
    """``url`` without user info, query or fragment (so no credential ends up in names or logs)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))


class ChatEndpoint:
    """An OpenAI-compatible ``/chat/completions`` endpoint.

    Args:
        base_url: e.g. ``https://api.openai.com/v1`` (``/chat/completions`` is appended).
        model: the model's name on that server.
        api_key_env: name of the environment variable holding the API key; None sends no
            ``Authorization`` header (local servers).
        timeout: seconds per request (connect and each read).
        max_retries: retries after the first attempt for transient failures.
        backoff_base: first retry delay in seconds; doubles each retry, times a jitter factor in
            [0.5, 1.5).
        backoff_max: cap on any single delay, ``Retry-After`` included.
        role: who asks, in messages ("the judge server ... refused the request").
        no_key_hint: how to configure a server that needs no key, for the unset-key message.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str | None = ENDPOINT.api_key_env,
        timeout: float = ENDPOINT.timeout,
        max_retries: int = ENDPOINT.max_retries,
        backoff_base: float = ENDPOINT.backoff_base,
        backoff_max: float = ENDPOINT.backoff_max,
        role: str = "judge",
        no_key_hint: str = 'set "api_key_env" to null',
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise TLExtractError(
                f"{role} base_url must start with http:// or https://, got {public_url(base_url)!r}"
            )
        if max_retries < 0 or timeout <= 0:
            raise TLExtractError(
                f"{role} settings out of range: need max_retries >= 0, timeout > 0"
            )
        self.base_url = base_url.rstrip("/")
        self.url = self.base_url + "/chat/completions"
        self.model = model
        self.api_key_env = api_key_env
        self.timeout = float(timeout)
        self.max_retries = max_retries
        self.backoff_base = float(backoff_base)
        self.backoff_max = float(backoff_max)
        self.role = role
        self._api_key: str | None = None
        if api_key_env is not None:
            key = os.environ.get(api_key_env)
            if not key:
                raise TLExtractError(
                    f"the {role} reads its API key from the environment variable {api_key_env}, "
                    f"which is not set; export it, or {no_key_hint} for a server that needs no key"
                )
            self._api_key = key
        self._opener = urllib.request.build_opener(_NoRedirect)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(base_url={public_url(self.base_url)!r}, "
            f"model={self.model!r}, api_key_env={self.api_key_env!r})"
        )

    def call(
        self, attempt: Callable[[], T], abort: threading.Event | None = None,
        failures: Failures | None = None,
    ) -> T:  # fmt: skip
        """``attempt()`` (a request and the reading of its answer), retried while it raises
        Retryable. Raises GaveUp after the last retry, on a Malformed answer or when ``abort``
        is set, TLExtractError at once on a non-retryable error. Failed attempts are counted
        in ``failures`` (default: said when this call ends)."""
        if failures is None:
            failures = Failures()
            try:
                return self.call(attempt, abort, failures)
            finally:
                failures.report(self.role, public_url(self.url))
        abort = abort or threading.Event()
        error = ""
        for n in range(self.max_retries + 1):
            if abort.is_set():
                raise GaveUp("cancelled")
            try:
                return attempt()
            except Malformed as e:
                failures.add(str(e), gave_up=True)
                raise GaveUp(f"{e}; not retried: the server would answer the same") from None
            except Retryable as e:
                error = str(e)
                delay = e.retry_after if e.retry_after is not None else self._backoff(n)
            failures.add(error, gave_up=n == self.max_retries)
            if n < self.max_retries and abort.wait(min(delay, self.backoff_max)):
                raise GaveUp("cancelled")
        raise GaveUp(f"gave up after {self.max_retries + 1} attempts: {error}")

    def complete(self, messages: list[dict[str, str]]) -> str:
        """The assistant's reply to ``messages`` (with retries, as :meth:`call`). A reply cut off
        at the server's token limit is an error: the rest of it cannot be asked for."""
        payload = {"model": self.model, "messages": messages}
        try:
            return self.call(lambda: self._reply_text(self.post(payload)))
        except GaveUp as e:
            raise TLExtractError(f"the {self.role} server {public_url(self.url)}: {e}") from None

    def _reply_text(self, body: bytes) -> str:
        try:
            choice = json.loads(body)["choices"][0]
            content = choice["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise Malformed(f"malformed response ({type(e).__name__})") from None
        if choice.get("finish_reason") == "length":
            raise TLExtractError(
                f"the {self.role} server {public_url(self.url)} cut the reply off at its output "
                f"token limit; use a model or server that allows longer replies"
            )
        if not isinstance(content, str):
            raise Malformed("malformed response (no text content)")
        return content

    def post(self, payload: dict[str, Any]) -> bytes:
        """One POST of ``payload``; the response body, or Retryable / TLExtractError."""
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key is not None:
            headers["Authorization"] = f"Bearer {self._api_key}"
        request = urllib.request.Request(
            self.url, data=json.dumps(payload).encode("utf-8"), headers=headers, method="POST"
        )
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                return response.read()
        except urllib.error.HTTPError as e:
            self._raise_for_status(e)
        except (TimeoutError, urllib.error.URLError, http.client.HTTPException, OSError) as e:
            reason = e.reason if isinstance(e, urllib.error.URLError) else e
            raise Retryable(f"{type(reason).__name__}: {reason}") from None

    def _backoff(self, attempt: int) -> float:
        return self.backoff_base * (2.0**attempt) * (0.5 + random.random())

    def _scrub(self, text: str) -> str:
        if self._api_key:
            text = text.replace(self._api_key, "***")
        return text

    def _raise_for_status(self, e: urllib.error.HTTPError) -> NoReturn:
        status = e.code
        where = public_url(self.url)
        if status in (401, 403):
            # The body is not shown: servers echo (parts of) the key in it.
            raise TLExtractError(
                f"the {self.role} server {where} refused the request (HTTP {status}): check the "
                f"API key in the environment variable {self.api_key_env}"
                + (" (no key is sent because api_key_env is null)" if self._api_key is None else "")
            ) from None
        try:
            detail = self._scrub(e.read(600).decode("utf-8", "replace")).strip()
        except Exception:  # noqa: BLE001 - the body is only decoration
            detail = ""
        detail = f": {' '.join(detail.split())[:300]}" if detail else ""
        if status == 404:
            raise TLExtractError(
                f"the {self.role} server answered 404 Not Found for {where} with model "
                f"{self.model!r}: check base_url ({public_url(self.base_url)}) and the model "
                f"name{detail}"
            ) from None
        if status in RETRY_STATUSES or status >= 500:
            raise Retryable(f"HTTP {status}", parse_retry_after(e.headers.get("Retry-After")))
        if 300 <= status < 400:
            raise TLExtractError(
                f"the {self.role} server {where} redirected (HTTP {status}) to "
                f"{public_url(e.headers.get('Location', '?'))}; use the final URL as base_url"
            ) from None
        raise TLExtractError(
            f"the {self.role} server {where} rejected the request (HTTP {status}){detail}"
        ) from None
