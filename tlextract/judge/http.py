"""A judge behind an OpenAI-compatible chat-completions server, read through next-token logprobs.

Each filled prompt is one request::

    POST {base_url}/chat/completions
    {"model": ..., "messages": [{"role": "user", "content": prompt}], "max_tokens": 1,
     "temperature": 0, "logprobs": true, "top_logprobs": 20}

and the score comes from ``choices[0].logprobs.content[0].top_logprobs``: every token that reads
as an integer 0-100 (surrounding whitespace ignored, as persona_vectors' ``int(token)``) adds its
probability to that integer, then :func:`tlextract.judge.base.aggregate_score` applies.

Errors and the API key are handled as :mod:`tlextract.judge.chat` describes: transient failures
are retried (one warning per cause per batch, with a count), a malformed response is not, and a
prompt that still fails gets a *failed* Score (never a number, never cached);
401/403, 404, a redirect, any other 4xx, and a server that returns no logprobs raise TLExtractError
at once. The key never reaches ``name`` (the cache key), logs or messages. Only the standard
library is used.
"""

from __future__ import annotations

import json
import math
import threading
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from typing import Any

from tlextract.config import ENDPOINT
from tlextract.errors import TLExtractError
from tlextract.judge.base import DEFAULT_MIN_MASS, Score, aggregate_score
from tlextract.judge.chat import (
    ChatEndpoint,
    Failures,
    GaveUp,
    Malformed,
    parse_retry_after,
    public_url,
)

__all__ = ["OpenAIJudge", "parse_retry_after", "top_logprobs_to_probs"]


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


class OpenAIJudge(ChatEndpoint):
    """Judge through an OpenAI-compatible ``/chat/completions`` endpoint with logprobs.

    Args:
        base_url, model: the endpoint, see :class:`tlextract.judge.chat.ChatEndpoint`.
        max_concurrency: at most this many requests in flight.
        min_mass: see :func:`tlextract.judge.base.aggregate_score`.
        top_logprobs: how many alternatives the server reports (OpenAI allows up to 20).
        endpoint: ``api_key_env``, ``timeout``, ``max_retries``, ``backoff_base``,
            ``backoff_max``: the endpoint's key and retries, as :class:`ChatEndpoint` takes them
            (defaults: :data:`tlextract.config.ENDPOINT`).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        max_concurrency: int = ENDPOINT.max_concurrency,
        min_mass: float = DEFAULT_MIN_MASS,
        top_logprobs: int = ENDPOINT.top_logprobs,
        **endpoint: Any,
    ) -> None:
        if max_concurrency < 1 or top_logprobs < 1:
            raise TLExtractError(
                "judge settings out of range: need max_concurrency >= 1, top_logprobs >= 1"
            )
        super().__init__(base_url, model, role="judge", **endpoint)
        self.max_concurrency = max_concurrency
        self.min_mass = float(min_mass)
        self.top_logprobs = top_logprobs
        self.name = (
            f"openai:{model}@{public_url(self.base_url)}:top{top_logprobs}:min_mass={min_mass:g}"
        )

    # ---------------------------------------------------------------------------------------

    def score(self, prompts: list[str]) -> list[Score]:
        """One Score per prompt; at most ``max_concurrency`` requests in flight. Raises
        TLExtractError (after cancelling what has not started) on a non-retryable error."""
        if not prompts:
            return []
        abort, failures = threading.Event(), Failures()
        pool = ThreadPoolExecutor(
            max_workers=min(self.max_concurrency, len(prompts)), thread_name_prefix="judge-http"
        )
        futures: list[Future[Score]] = [
            pool.submit(self._score_one, p, abort, failures) for p in prompts
        ]
        try:
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            for future in done:
                future.result()  # re-raises the first fatal error
            results = [f.result() for f in futures]
        except BaseException:
            abort.set()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        finally:
            failures.report(self.role, public_url(self.url))
        pool.shutdown(wait=True)
        return results

    def _score_one(self, prompt: str, abort: threading.Event, failures: Failures) -> Score:
        try:
            return self.call(lambda: self._parse(self.post(self._payload(prompt))), abort, failures)
        except GaveUp as e:
            return Score.failure(str(e))

    def _payload(self, prompt: str) -> dict[str, Any]:
        return {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": 1,
            "temperature": 0,
            "logprobs": True,
            "top_logprobs": self.top_logprobs,
        }

    def _parse(self, body: bytes) -> Score:
        try:
            data = json.loads(body)
            choice = data["choices"][0]
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise Malformed(f"malformed response ({type(e).__name__})") from None
        logprobs = choice.get("logprobs") if isinstance(choice, dict) else None
        content = logprobs.get("content") if isinstance(logprobs, dict) else None
        if content is None:
            raise TLExtractError(
                f"the judge server {public_url(self.url)} returned no logprobs for model "
                f"{self.model!r}; the OpenAI judge needs a model and server that support "
                "logprobs / top_logprobs"
            )
        if not content:
            return Score(None)  # the model produced no token at all: nothing on 0-100
        top = content[0].get("top_logprobs") or []
        return Score(aggregate_score(top_logprobs_to_probs(top), self.min_mass))
