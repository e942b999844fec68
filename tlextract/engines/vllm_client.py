"""The parts of a vLLM server's OpenAI-compatible API that generation needs: token ids in and out
(``POST /v1/completions`` with ``return_token_ids``), one seed per request, and the checks that
the server serves the model the run names (``/v1/models``, ``/tokenize``).

Every failure is a :class:`TLExtractError` naming the server and the fix: an unreachable server,
one that serves another model, or one that stops answering mid-run (the generate stage has kept
every finished batch by then, so a rerun resumes). Only the standard library is used.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tlextract.config import GenerationSettings
from tlextract.errors import TLExtractError
from tlextract.ops.generate import Generation

# A probe for the tokenizer check: words, digits, punctuation, non-ASCII and a chat marker.
PROBE = "The capital of France is Paris. 42 + 7 = 49; naïve café — 東京 <|im_end|>"
RESUME = "every finished batch is kept: run the same command again to resume"


class ServerGone(TLExtractError):
    """The server did not answer (refused, reset, timed out)."""


def api_root(base_url: str) -> str:
    """``http://host:port`` from a base URL given with or without ``/v1``."""
    return base_url.rstrip("/").removesuffix("/v1")


class VLLMClient:
    def __init__(
        self,
        base_url: str,
        model: str,
        timeout: float,
        what: str,
        explain: Callable[[], str] | None = None,
    ) -> None:
        self.root = api_root(base_url)
        self.model = model
        self.timeout = timeout
        self.what = what  # "the vLLM server tlextract started (log: ...)" or the URL
        self.peak_rss: int | None = None  # a server tlextract started: its peak memory, bytes
        self.explain = explain  # a server tlextract started: the root cause from its log
        key = os.environ.get("VLLM_API_KEY")  # what `vllm serve --api-key` checks by default
        self._headers = {"Content-Type": "application/json"}
        if key:
            self._headers["Authorization"] = f"Bearer {key}"

    def request(self, path: str, payload: dict[str, Any] | None = None) -> Any:
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(self.root + path, data, self._headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as reply:
                body = reply.read()
                return json.loads(body) if body else None  # /health answers 200 with no body
        except urllib.error.HTTPError as e:
            detail = " ".join(e.read().decode(errors="replace")[:300].split())
            raise TLExtractError(
                f"{self.what} answered {path} with HTTP {e.code}: {detail}{self._cause(e.code)}",
                parameters=("engine",),
            ) from None
        except (OSError, ValueError) as e:  # refused, reset, timeout, a torn or non-JSON reply
            reason = getattr(e, "reason", e)
            raise ServerGone(
                f"{self.what} did not answer {path} ({reason}){self._cause()}",
                parameters=("engine",),
            ) from None

    def _cause(self, status: int = 500) -> str:
        """What the server's log says went wrong, for a server error of a server we started."""
        if self.explain is None or status < 500:
            return ""
        return (f"; vLLM's log says {self.explain()} (if vLLM cannot run this model, use "
                'engine="tl")')  # fmt: skip

    def check_model(self, tokenizer: Any, label: str) -> None:
        """The server serves ``self.model`` with the same tokenizer as ``label`` here (token ids
        cross the API, so another tokenizer would silently mean other words)."""
        served = [m.get("id") for m in self.request("/v1/models").get("data", [])]
        if self.model not in served:
            raise TLExtractError(
                f"{self.what} serves {', '.join(map(str, served)) or 'no model'}, not "
                f"{self.model!r}. Start it with {label} (--served-model-name {self.model}), or "
                "set engine.served_model to the name it serves if that is the same model."
            )
        theirs = self.request("/tokenize", {"model": self.model, "prompt": PROBE,
                                            "add_special_tokens": False}).get("tokens")  # fmt: skip
        if theirs != tokenizer.encode(PROBE, add_special_tokens=False):
            raise TLExtractError(
                f"{self.what} serves {self.model!r} with another tokenizer than {label}'s (a "
                "test sentence tokenizes differently): it serves another model. Serve the "
                "same model directory or Hugging Face id the run names."
            )

    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        settings: GenerationSettings,
        seeds: Sequence[int],
        stops: Sequence[int],
    ) -> list[Generation]:
        """All prompts in flight at once (the server batches them), one seed each."""
        pool = ThreadPoolExecutor(max_workers=max(1, len(prompt_ids)))
        try:
            jobs = [pool.submit(self._one, p, settings, s, stops)
                    for p, s in zip(prompt_ids, seeds, strict=True)]  # fmt: skip
            return [job.result() for job in jobs]
        except ServerGone as e:
            raise ServerGone(f"{e} during generation; {RESUME}.", parameters=e.parameters) from None
        finally:
            # On an error or Ctrl-C, do not wait for requests in flight: the stage stops the
            # server it started, which ends them.
            pool.shutdown(wait=False, cancel_futures=True)

    def _one(
        self, prompt: Sequence[int], settings: GenerationSettings, seed: int, stops: Sequence[int]
    ) -> Generation:
        sampled = settings.do_sample
        choice = self.request("/v1/completions", {
            "model": self.model, "prompt": list(prompt), "max_tokens": settings.max_new_tokens,
            "temperature": settings.temperature if sampled else 0.0,
            "top_p": (settings.top_p or 1.0) if sampled else 1.0, "seed": seed,
            # Explicit neutral values: a server's generation_config.json defaults never apply.
            "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0, "presence_penalty": 0.0,
            "frequency_penalty": 0.0, "stop_token_ids": list(stops), "return_token_ids": True,
        })["choices"][0]  # fmt: skip
        ids = list(choice.get("token_ids") or [])
        # A stop token (eos or end of turn) ends the response and is not part of it, as in the
        # TransformerLens engine.
        stopped = choice.get("finish_reason") == "stop" and bool(ids) and ids[-1] in stops
        if choice.get("finish_reason") not in ("stop", "length"):
            raise TLExtractError(
                f"{self.what} ended a response with finish_reason "
                f"{choice.get('finish_reason')!r}; {RESUME}."
            )
        return Generation(ids[:-1] if stopped else ids, stopped)
