"""A judge behind an OpenAI-compatible chat-completions server, read through next-token logprobs.

Each filled prompt is one request::

    POST {base_url}/chat/completions
    {"model": ..., "messages": [{"role": "user", "content": prompt}], "max_tokens": 1,
     "temperature": 0, "logprobs": true, "top_logprobs": 20}

and the score comes from ``choices[0].logprobs.content[0].top_logprobs``: every token that reads
as an integer 0-100 (surrounding whitespace ignored, as persona_vectors' ``int(token)``) adds its
probability to that integer, then :func:`tlextract.judge.base.aggregate_score` applies.

Errors:

* 429, 408, 409, 425, 5xx, timeouts and connection errors are retried with exponential backoff and
  jitter (``Retry-After`` is honoured, up to ``backoff_max``). A prompt that still fails gets a
  *failed* Score: never a number, never cached.
* 401/403, 404, a redirect, any other 4xx, and a server that returns no logprobs raise
  TLExtractError at once: they would fail every request the same way.

The API key is read from the environment variable named by ``api_key_env`` and only ever put in
the ``Authorization`` header: it is not stored on disk, in ``name`` (the cache key), in logs or in
exception messages (server error bodies are never shown for 401/403 and are scrubbed otherwise).
Only the standard library is used.
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
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from typing import Any, NoReturn

from tlextract.errors import TLExtractError
from tlextract.judge.base import DEFAULT_MIN_MASS, Score, aggregate_score

__all__ = ["OpenAIJudge", "parse_retry_after", "top_logprobs_to_probs"]

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({408, 409, 425, 429})
"""HTTP statuses retried besides every 5xx."""


class _Retryable(Exception):
    """A transient failure: retry after ``retry_after`` seconds if given, else back off."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


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


def top_logprobs_to_probs(top_logprobs: list[dict[str, Any]]) -> dict[int, float]:
    """Probabilities of the integers 0-100 among the top logprobs of one position.

    A token counts when, stripped of whitespace, it is ASCII digits whose value is 0-100; tokens
    naming the same integer (``"7"`` and ``" 7"``) add up. Other tokens are ignored.
    """
    probs: dict[int, float] = {}
    for entry in top_logprobs:
        token = entry.get("token")
        logprob = entry.get("logprob")
        if not isinstance(token, str) or not isinstance(logprob, int | float):
            continue
        text = token.strip()
        if not text or not text.isascii() or not text.isdigit():
            continue
        number = int(text)
        if number <= 100:
            probs[number] = probs.get(number, 0.0) + math.exp(logprob)
    return probs


def _public_url(url: str) -> str:
    """``url`` without user info, query or fragment (so no credential ends up in names or logs)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))


class OpenAIJudge:
    """Judge through an OpenAI-compatible ``/chat/completions`` endpoint with logprobs.

    Args:
        base_url: e.g. ``https://api.openai.com/v1`` (``/chat/completions`` is appended).
        model: the judge model's name on that server.
        api_key_env: name of the environment variable holding the API key; None sends no
            ``Authorization`` header (local servers).
        max_concurrency: at most this many requests in flight.
        timeout: seconds per request (connect and each read).
        max_retries: retries after the first attempt for transient failures.
        min_mass: see :func:`tlextract.judge.base.aggregate_score`.
        backoff_base: first retry delay in seconds; doubles each retry, times a jitter factor in
            [0.5, 1.5).
        backoff_max: cap on any single delay, ``Retry-After`` included.
        top_logprobs: how many alternatives the server reports (OpenAI allows up to 20).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str | None = "OPENAI_API_KEY",
        max_concurrency: int = 8,
        timeout: float = 30.0,
        max_retries: int = 5,
        min_mass: float = DEFAULT_MIN_MASS,
        backoff_base: float = 1.0,
        backoff_max: float = 60.0,
        top_logprobs: int = 20,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise TLExtractError(
                f"judge base_url must start with http:// or https://, got {_public_url(base_url)!r}"
            )
        if max_concurrency < 1 or max_retries < 0 or timeout <= 0 or top_logprobs < 1:
            raise TLExtractError(
                "judge settings out of range: need max_concurrency >= 1, max_retries >= 0, "
                "timeout > 0, top_logprobs >= 1"
            )
        self.base_url = base_url.rstrip("/")
        self.url = self.base_url + "/chat/completions"
        self.model = model
        self.api_key_env = api_key_env
        self.max_concurrency = max_concurrency
        self.timeout = float(timeout)
        self.max_retries = max_retries
        self.min_mass = float(min_mass)
        self.backoff_base = float(backoff_base)
        self.backoff_max = float(backoff_max)
        self.top_logprobs = top_logprobs
        self._api_key: str | None = None
        if api_key_env is not None:
            key = os.environ.get(api_key_env)
            if not key:
                raise TLExtractError(
                    f"the OpenAI judge reads its API key from the environment variable "
                    f'{api_key_env}, which is not set; export it, or set "api_key_env" to null '
                    "for a server that needs no key"
                )
            self._api_key = key
        self.name = (
            f"openai:{model}@{_public_url(self.base_url)}:top{top_logprobs}:min_mass={min_mass:g}"
        )
        self._opener = urllib.request.build_opener(_NoRedirect)

    def __repr__(self) -> str:
        return (
            f"OpenAIJudge(base_url={_public_url(self.base_url)!r}, model={self.model!r}, "
            f"api_key_env={self.api_key_env!r})"
        )

    # ---------------------------------------------------------------------------------------

    def score(self, prompts: list[str]) -> list[Score]:
        """One Score per prompt; at most ``max_concurrency`` requests in flight. Raises
        TLExtractError (after cancelling what has not started) on a non-retryable error."""
        if not prompts:
            return []
        abort = threading.Event()
        pool = ThreadPoolExecutor(
            max_workers=min(self.max_concurrency, len(prompts)), thread_name_prefix="judge-http"
        )
        futures: list[Future[Score]] = [pool.submit(self._score_one, p, abort) for p in prompts]
        try:
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            for future in done:
                future.result()  # re-raises the first fatal error
            results = [f.result() for f in futures]
        except BaseException:
            abort.set()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
        return results

    def _score_one(self, prompt: str, abort: threading.Event) -> Score:
        error = ""
        for attempt in range(self.max_retries + 1):
            if abort.is_set():
                return Score.failure("cancelled")
            try:
                body = self._request(prompt)
                return self._parse(body)
            except _Retryable as e:
                error = str(e)
                delay = e.retry_after if e.retry_after is not None else self._backoff(attempt)
            delay = min(delay, self.backoff_max)
            if attempt < self.max_retries:
                log.warning(
                    "judge request to %s failed (%s); retry %d/%d in %.2fs",
                    _public_url(self.url),
                    error,
                    attempt + 1,
                    self.max_retries,
                    delay,
                )
                if abort.wait(delay):
                    return Score.failure("cancelled")
        log.warning(
            "judge request to %s gave up after %d attempts: %s",
            _public_url(self.url),
            self.max_retries + 1,
            error,
        )
        return Score.failure(f"gave up after {self.max_retries + 1} attempts: {error}")

    def _backoff(self, attempt: int) -> float:
        return self.backoff_base * (2.0**attempt) * (0.5 + random.random())

    def _scrub(self, text: str) -> str:
        if self._api_key:
            text = text.replace(self._api_key, "***")
        return text

    def _request(self, prompt: str) -> bytes:
        payload = {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": 1,
            "temperature": 0,
            "logprobs": True,
            "top_logprobs": self.top_logprobs,
        }
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
            raise _Retryable(f"{type(reason).__name__}: {reason}") from None

    def _raise_for_status(self, e: urllib.error.HTTPError) -> NoReturn:
        status = e.code
        where = _public_url(self.url)
        if status in (401, 403):
            # The body is not shown: servers echo (parts of) the key in it.
            raise TLExtractError(
                f"the judge server {where} refused the request (HTTP {status}): check the API key "
                f"in the environment variable {self.api_key_env}"
                + (" (no key is sent because api_key_env is null)" if self._api_key is None else "")
            ) from None
        try:
            detail = self._scrub(e.read(600).decode("utf-8", "replace")).strip()
        except Exception:  # noqa: BLE001 - the body is only decoration
            detail = ""
        detail = f": {detail[:300]}" if detail else ""
        if status == 404:
            raise TLExtractError(
                f"the judge server answered 404 Not Found for {where} with model {self.model!r}: "
                f"check base_url ({_public_url(self.base_url)}) and the model name{detail}"
            ) from None
        if status in RETRY_STATUSES or status >= 500:
            raise _Retryable(f"HTTP {status}", parse_retry_after(e.headers.get("Retry-After")))
        if 300 <= status < 400:
            raise TLExtractError(
                f"the judge server {where} redirected (HTTP {status}) to "
                f"{_public_url(e.headers.get('Location', '?'))}; use the final URL as base_url"
            ) from None
        raise TLExtractError(
            f"the judge server {where} rejected the request (HTTP {status}){detail}"
        ) from None

    def _parse(self, body: bytes) -> Score:
        try:
            data = json.loads(body)
            choice = data["choices"][0]
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise _Retryable(f"malformed response ({type(e).__name__})") from None
        logprobs = choice.get("logprobs") if isinstance(choice, dict) else None
        content = logprobs.get("content") if isinstance(logprobs, dict) else None
        if content is None:
            raise TLExtractError(
                f"the judge server {_public_url(self.url)} returned no logprobs for model "
                f"{self.model!r}; the OpenAI judge needs a model and server that support "
                "logprobs / top_logprobs"
            )
        if not content:
            return Score(None)  # the model produced no token at all: nothing on 0-100
        top = content[0].get("top_logprobs") or []
        return Score(aggregate_score(top_logprobs_to_probs(top), self.min_mass))
