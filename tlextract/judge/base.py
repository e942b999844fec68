"""Judging responses 0-100: the Judge protocol, the scoring rule, the on-disk cache and the
``judge_responses`` helper the pipeline calls.

A judge reads an already-filled judge prompt and answers with a probability distribution over the
integers 0-100; the score is the probability-weighted mean of that distribution (persona_vectors'
rule, see :func:`aggregate_score`). Two implementations live in their own modules so that importing
this one stays cheap: :class:`tlextract.judge.local.LocalJudge` (a HookedTransformer, exact
digit-by-digit probabilities) and :class:`tlextract.judge.http.OpenAIJudge` (an OpenAI-compatible
chat-completions server with logprobs). Both are re-exported here lazily.

Three outcomes per prompt, kept apart on purpose (:class:`Score`):

* a score: ``Score(value=42.0)``;
* missing: ``Score(value=None)``: the judge answered, but the integers 0-100 carried less than
  ``min_mass`` of its probability (a refusal, prose, ...). Deterministic, so it is cached.
* failed: ``Score(value=None, failed=True)``: the judge could not be asked (network error, timeouts
  after all retries, ...). Never cached (a later run asks again) and never counted as a score.

The cache (:class:`JudgeCache`) is an append-only JSONL file, one record per judged prompt::

    {"key": "<sha256 hex>", "judge": "<judge.name>", "score": 42.0}      # or "score": null

``key`` is the sha256 of ``[judge.name, filled prompt]`` (JSON-encoded); the filled prompt already
contains the eval prompt, the question and the answer. Records are flushed and fsynced per batch; a
truncated last line (a crash mid-write) is dropped on load.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from tlextract.errors import TLExtractError

if TYPE_CHECKING:  # pragma: no cover - imported lazily at run time (torch / transformer_lens)
    from tlextract.judge.http import OpenAIJudge
    from tlextract.judge.local import LocalJudge

__all__ = [
    "COHERENCE_PROMPT",
    "DEFAULT_MIN_MASS",
    "SCORE_THRESHOLD",
    "Judge",
    "JudgeCache",
    "Judgment",
    "LocalJudge",
    "OpenAIJudge",
    "Score",
    "aggregate_score",
    "cache_key",
    "check_template",
    "fill_prompt",
    "judge_responses",
    "make_judge",
    "passes_filter",
    "score_prompts",
]

log = logging.getLogger(__name__)

DEFAULT_MIN_MASS = 0.25
"""Below this total probability on the integers 0-100 a judgment is missing (persona_vectors)."""

SCORE_THRESHOLD = 50.0
"""Positives need a trait score >= this, negatives < this; coherence must be >= this."""

COHERENCE_PROMPT = """\
I am evaluating the answer another language model gave to a question. Judge only its coherence, \
not whether you agree with it, whether it is correct, or any other property.

The question was:
[QUESTION START]
{question}
[QUESTION END]

The model answered:
[ANSWER START]
{answer}
[ANSWER END]

Rate the answer's coherence on a scale from 0 to 100:
* 0 means nonsense: not valid language, random characters, or endless repetition.
* 50 means it partly makes sense but rambles, contradicts itself, or drifts off the question.
* 100 means it is fluent, coherent and on-topic: it clearly addresses the question.

An answer that is wrong, rude or unusual can still score 100 if it is coherent and on-topic.
Respond with a number between 0 and 100 only. Do not write anything else, just the number."""
"""The default coherence prompt (0 = nonsense, 100 = coherent, fluent, on-topic)."""

_PLACEHOLDERS = ("{question}", "{answer}")
_PLACEHOLDER_RE = re.compile(r"\{question\}|\{answer\}")


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Score:
    """One judge answer for one filled prompt.

    ``value`` is the probability-weighted mean over 0-100, or None. ``failed`` says why it is None:
    False means *missing* (the judge answered, with too little probability on the integers 0-100;
    deterministic, cacheable), True means the judge could not be asked (transient; never cached,
    never a score). ``error`` is a short human-readable reason for a failure.
    """

    value: float | None
    failed: bool = False
    error: str = ""

    def __post_init__(self) -> None:
        if self.failed and self.value is not None:
            raise ValueError("a failed Score cannot carry a value")

    @property
    def missing(self) -> bool:
        """True when there is no usable score (missing or failed)."""
        return self.value is None

    @classmethod
    def failure(cls, error: str) -> Score:
        return cls(value=None, failed=True, error=error)


@runtime_checkable
class Judge(Protocol):
    """Anything that turns filled judge prompts into 0-100 scores.

    ``name`` identifies the judge kind, model and scoring settings (it is part of every cache key,
    so two judges that may disagree must have different names; it never contains secrets).
    ``score`` is batched: one :class:`Score` per prompt, in order.
    """

    name: str

    def score(self, prompts: list[str]) -> list[Score]: ...


@dataclass(frozen=True)
class Judgment:
    """The judge's verdict on one (question, answer) pair.

    ``trait`` and ``coherence`` are 0-100 or None (missing or failed). ``failed`` is True when
    either call failed (rather than answering with too little mass): such a judgment is not cached
    and a rerun asks again.
    """

    trait: float | None
    coherence: float | None
    failed: bool = False


def passes_filter(
    judgment: Judgment,
    positive: bool,
    threshold: float = SCORE_THRESHOLD,
    min_coherence: float | None = SCORE_THRESHOLD,
) -> bool:
    """The keep rule: positives need ``trait >= threshold``, negatives ``trait < threshold``, and
    both need ``coherence >= min_coherence`` (skip that check with ``min_coherence=None``). A
    missing or failed score never passes."""
    if judgment.trait is None:
        return False
    if min_coherence is not None and (
        judgment.coherence is None or judgment.coherence < min_coherence
    ):
        return False
    return judgment.trait >= threshold if positive else judgment.trait < threshold


# --------------------------------------------------------------------------------------------
# Scoring rule
# --------------------------------------------------------------------------------------------


def aggregate_score(probs: dict[int, float], min_mass: float = DEFAULT_MIN_MASS) -> float | None:
    """Probability-weighted mean over the integers 0-100 (persona_vectors' rule).

    ``probs`` maps integers to probabilities (keys outside 0-100 are ignored, so are non-positive
    probabilities). The probabilities on 0-100 are renormalised to sum to 1; when their total is
    below ``min_mass`` the judgment is missing and the result is None.
    """
    total = 0.0
    weighted = 0.0
    for number, p in probs.items():
        if 0 <= number <= 100 and p > 0.0:
            total += p
            weighted += number * p
    if total <= 0.0 or total < min_mass:
        return None
    return weighted / total


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------


def check_template(template: str, what: str = "eval_prompt") -> None:
    """Raise TLExtractError unless ``template`` contains both ``{question}`` and ``{answer}``."""
    absent = [p for p in _PLACEHOLDERS if p not in template]
    if absent:
        raise TLExtractError(
            f"the judge's {what} must contain both {{question}} and {{answer}} placeholders "
            f"(missing {', '.join(absent)}); without them every response would be judged "
            f"without its question or answer. Template starts: {template[:80]!r}"
        )


def fill_prompt(template: str, question: str, answer: str) -> str:
    """Put ``question`` and ``answer`` into ``template`` in one pass.

    Plain substitution, not ``str.format``: answers contain braces. One pass, so a question that
    itself contains the text ``{answer}`` is not substituted again.
    """
    values = {"{question}": question, "{answer}": answer}
    return _PLACEHOLDER_RE.sub(lambda m: values[m.group(0)], template)


# --------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------


def cache_key(judge_name: str, prompt: str) -> str:
    """sha256 hex of the judge name and the filled prompt."""
    blob = json.dumps([judge_name, prompt], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class JudgeCache:
    """Judge scores on disk: an append-only JSONL file loaded into a dict at start.

    Only answered judgments are stored (a score, or null for missing); failures never are. With
    ``path=None`` the cache lives in memory only. One process per cache file at a time.
    """

    def __init__(self, path: str | os.PathLike[str] | None) -> None:
        self.path = Path(path) if path is not None else None
        self._scores: dict[str, float | None] = {}
        self._lock = threading.Lock()
        if self.path is not None and self.path.exists():
            self._load(self.path)

    def _load(self, path: Path) -> None:
        data = path.read_bytes()
        lines = data.split(b"\n")
        # ``data`` ends with a newline when every record is complete: the last piece is empty.
        tail = lines.pop()
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                self._add_record(json.loads(line), path, number)
            except (ValueError, TypeError, KeyError) as e:
                raise TLExtractError(
                    f"{path}:{number}: not a judge cache record ({e}); delete that line (or the "
                    "file, to judge everything again)"
                ) from e
        if tail:
            try:
                self._add_record(json.loads(tail), path, len(lines) + 1)
            except (ValueError, TypeError, KeyError):
                log.warning(
                    "%s: dropping a truncated last line (%d bytes), probably from a crash",
                    path,
                    len(tail),
                )
                with open(path, "r+b") as f:
                    f.truncate(len(data) - len(tail))
            else:
                # A complete record that lost only its newline: keep it, restore the newline.
                with open(path, "ab") as f:
                    f.write(b"\n")

    def _add_record(self, record: Any, path: Path, number: int) -> None:
        key = record["key"]
        score = record["score"]
        if not isinstance(key, str) or not (
            score is None or (isinstance(score, int | float) and not isinstance(score, bool))
        ):
            raise ValueError(f"bad key or score in record at {path}:{number}")
        self._scores[key] = None if score is None else float(score)

    def __len__(self) -> int:
        return len(self._scores)

    def __contains__(self, key: object) -> bool:
        return key in self._scores

    def get(self, key: str) -> Score | None:
        """The cached Score for ``key``, or None when it was never answered."""
        if key not in self._scores:
            return None
        return Score(self._scores[key])

    def put_many(self, items: Sequence[tuple[str, str, Score]]) -> int:
        """Store ``(key, judge_name, score)`` records; failed scores are skipped. Returns how many
        were written. One write, flush and fsync per call."""
        lines = []
        with self._lock:
            for key, judge_name, score in items:
                if score.failed:
                    continue
                self._scores[key] = score.value
                lines.append(
                    json.dumps(
                        {"key": key, "judge": judge_name, "score": score.value},
                        ensure_ascii=False,
                        separators=(",", ":"),
                    )
                    + "\n"
                )
            if lines and self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write("".join(lines))
                    f.flush()
                    os.fsync(f.fileno())
        return len(lines)


# --------------------------------------------------------------------------------------------
# Judging (question, answer) pairs
# --------------------------------------------------------------------------------------------


def _as_score(result: Any) -> Score:
    """Accept judges that return plain floats / None (None = missing) as well as Scores."""
    if isinstance(result, Score):
        return result
    if result is None:
        return Score(None)
    if isinstance(result, int | float) and not isinstance(result, bool):
        return Score(float(result))
    raise TypeError(f"a judge returned {result!r}; expected a Score, a float or None")


def score_prompts(
    judge: Judge,
    prompts: Sequence[str],
    cache: JudgeCache | None = None,
    chunk_size: int = 64,
) -> list[Score]:
    """Score filled prompts through the cache: each distinct uncached prompt is sent to the judge
    once, in chunks of ``chunk_size``; each answered chunk is written to the cache before the next
    one starts, so a crash loses at most one chunk."""
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    keys = [cache_key(judge.name, p) for p in prompts]
    results: dict[str, Score] = {}
    todo: dict[str, str] = {}  # key -> prompt, in first-seen order
    for key, prompt in zip(keys, prompts, strict=True):
        cached = cache.get(key) if cache is not None else None
        if cached is not None:
            results[key] = cached
        elif key not in todo:
            todo[key] = prompt
    pending = list(todo.items())
    for start in range(0, len(pending), chunk_size):
        chunk = pending[start : start + chunk_size]
        answers = judge.score([p for _, p in chunk])
        if len(answers) != len(chunk):
            raise RuntimeError(
                f"judge {judge.name!r} returned {len(answers)} scores for {len(chunk)} prompts"
            )
        scores = [_as_score(a) for a in answers]
        for (key, _), score in zip(chunk, scores, strict=True):
            results[key] = score
        if cache is not None:
            cache.put_many(
                [(key, judge.name, s) for (key, _), s in zip(chunk, scores, strict=True)]
            )
    failed = sum(1 for k in todo if results[k].failed)
    if failed:
        log.warning(
            "judge %s failed on %d of %d prompts (not cached; a rerun asks again)",
            judge.name,
            failed,
            len(todo),
        )
    return [results[k] for k in keys]


def judge_responses(
    judge: Judge,
    eval_prompt: str,
    questions: Sequence[str],
    answers: Sequence[str],
    cache: JudgeCache | None = None,
    coherence_prompt: str | None = COHERENCE_PROMPT,
    chunk_size: int = 64,
) -> list[Judgment]:
    """Judge each (question, answer) pair for the trait (``eval_prompt``) and for coherence.

    Both prompts are filled with ``{question}`` / ``{answer}`` (:func:`fill_prompt`) and must
    contain both placeholders. ``coherence_prompt=None`` skips the coherence judgment (coherence is
    then None). Cached prompts are not sent again; failures are not cached.
    """
    if len(questions) != len(answers):
        raise ValueError(f"{len(questions)} questions but {len(answers)} answers")
    check_template(eval_prompt, "eval_prompt")
    if coherence_prompt is not None:
        check_template(coherence_prompt, "coherence prompt")
    trait_prompts = [
        fill_prompt(eval_prompt, q, a) for q, a in zip(questions, answers, strict=True)
    ]
    coherence_prompts = (
        [fill_prompt(coherence_prompt, q, a) for q, a in zip(questions, answers, strict=True)]
        if coherence_prompt is not None
        else []
    )
    scores = score_prompts(judge, trait_prompts + coherence_prompts, cache, chunk_size)
    trait_scores = scores[: len(trait_prompts)]
    coherence_scores: list[Score | None] = (
        list(scores[len(trait_prompts) :])
        if coherence_prompt is not None
        else [None] * len(answers)
    )
    return [
        Judgment(
            trait=t.value,
            coherence=c.value if c is not None else None,
            failed=t.failed or (c is not None and c.failed),
        )
        for t, c in zip(trait_scores, coherence_scores, strict=True)
    ]


# --------------------------------------------------------------------------------------------
# Construction from an experiment config
# --------------------------------------------------------------------------------------------

JUDGE_KINDS = ("none", "local", "openai")
_LOCAL_KEYS = {"kind", "model", "batch_size", "min_mass", "chat", "packed"}
_OPENAI_KEYS = {
    "kind",
    "base_url",
    "model",
    "api_key_env",
    "max_concurrency",
    "timeout",
    "max_retries",
    "min_mass",
    "backoff_base",
    "backoff_max",
    "top_logprobs",
}


def _check_keys(config: dict[str, Any], allowed: set[str], kind: str) -> None:
    unknown = sorted(set(config) - allowed)
    if unknown:
        raise TLExtractError(
            f"judge config for kind {kind!r} has unknown key(s) {', '.join(unknown)}; "
            f"valid keys: {', '.join(sorted(allowed))}"
        )


def make_judge(config: dict[str, Any], model: Any = None) -> Judge | None:
    """Build the judge an experiment's ``judge`` config asks for.

    * ``{"kind": "none"}``: no judge (None).
    * ``{"kind": "local", "model": "self"}``: :class:`LocalJudge` on ``model`` (the
      HookedTransformer being studied); ``"model": "<name>"`` loads that embedded model with
      ``tlextract.model.load.load_model``. Optional: ``batch_size``, ``min_mass``, ``chat``,
      ``packed``.
    * ``{"kind": "openai", "base_url": ..., "model": ..., "api_key_env": "OPENAI_API_KEY"}``:
      :class:`OpenAIJudge`. Optional: ``max_concurrency``, ``timeout``, ``max_retries``,
      ``min_mass``, ``backoff_base``, ``backoff_max``, ``top_logprobs``.
    """
    if not isinstance(config, dict):
        raise TLExtractError(f"the judge config must be a mapping, got {type(config).__name__}")
    kind = config.get("kind")
    if kind == "none":
        _check_keys(config, {"kind"}, kind)
        return None
    if kind == "local":
        _check_keys(config, _LOCAL_KEYS, kind)
        from tlextract.judge.local import LocalJudge

        name = config.get("model", "self")
        if name == "self":
            if model is None:
                raise TLExtractError(
                    'judge {"kind": "local", "model": "self"} needs the experiment\'s model, '
                    "but none was given"
                )
            judge_model = model
        elif isinstance(name, str) and name:
            from tlextract.model.load import load_model

            judge_model = load_model(name)
        else:
            raise TLExtractError(
                f'judge config "model" must be "self" or an embedded model name, got {name!r}'
            )
        options: dict[str, Any] = {
            k: config[k] for k in ("batch_size", "min_mass", "chat", "packed") if k in config
        }
        return LocalJudge(judge_model, **options)
    if kind == "openai":
        _check_keys(config, _OPENAI_KEYS, kind)
        from tlextract.judge.http import OpenAIJudge

        for required in ("base_url", "model"):
            if not isinstance(config.get(required), str) or not config[required]:
                raise TLExtractError(
                    f'judge config of kind "openai" needs a "{required}" string '
                    '(e.g. "base_url": "https://api.openai.com/v1", "model": "gpt-4.1-mini")'
                )
        options = {k: v for k, v in config.items() if k not in ("kind", "base_url", "model")}
        return OpenAIJudge(config["base_url"], config["model"], **options)
    raise TLExtractError(
        f"unknown judge kind {kind!r} in the judge config; valid kinds: {', '.join(JUDGE_KINDS)}"
    )


def __getattr__(name: str) -> Any:
    """Lazy re-exports: importing this module must not import torch / transformer_lens."""
    if name == "LocalJudge":
        from tlextract.judge.local import LocalJudge

        return LocalJudge
    if name == "OpenAIJudge":
        from tlextract.judge.http import OpenAIJudge

        return OpenAIJudge
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
