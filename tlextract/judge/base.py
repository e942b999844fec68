"""Judging responses 0-100: the Judge protocol, the result types, the scoring rule and the
judge prompts. The cache and ``judge_responses`` are in :mod:`tlextract.judge.answers`, the judges
by kind in :mod:`tlextract.judge.registry`.

A judge reads an already-filled judge prompt and answers with a probability distribution over the
integers 0-100; the score is the probability-weighted mean of that distribution (persona_vectors'
rule, see :func:`aggregate_score`). Two implementations live in their own modules so that importing
this one stays cheap: :class:`tlextract.judge.local.LocalJudge` (a HookedTransformer, exact
digit-by-digit probabilities) and :class:`tlextract.judge.http.OpenAIJudge` (an OpenAI-compatible
chat-completions server with logprobs).

Three outcomes per prompt, kept apart on purpose (:class:`Score`):

* a score: ``Score(value=42.0)``;
* missing: ``Score(value=None)``: the judge answered, but the integers 0-100 carried less than
  ``min_mass`` of its probability (a refusal, prose, ...). Deterministic, so it is cached.
* failed: ``Score(value=None, failed=True)``: the judge could not be asked (network error, timeouts
  after all retries, ...). Never cached (a later run asks again) and never counted as a score.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from tlextract.config import DEFAULT_MIN_MASS, SCORE_THRESHOLD
from tlextract.errors import TLExtractError
from tlextract.traits import template_problem

__all__ = [
    "COHERENCE_PROMPT",
    "DEFAULT_MIN_MASS",
    "SCORE_THRESHOLD",
    "Judge",
    "Judgment",
    "Score",
    "aggregate_score",
    "check_template",
    "fill_prompt",
    "passes_filter",
]

log = logging.getLogger(__name__)

# DEFAULT_MIN_MASS: below this total probability on the integers 0-100 a judgment is missing
# (persona_vectors). SCORE_THRESHOLD: positives need a trait score >= this, negatives < this;
# coherence must be >= this. Both live in config, where the judge block is validated.

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
    """Raise TLExtractError unless ``template`` has ``{question}``, ``{answer}`` and no other
    placeholder (the rule trait files are checked with)."""
    problem = template_problem(template)
    if problem:
        raise TLExtractError(f"the judge's {what} {problem} Template starts: {template[:80]!r}")


def fill_prompt(template: str, question: str, answer: str) -> str:
    """Put ``question`` and ``answer`` into ``template`` in one pass.

    Plain substitution, not ``str.format``: answers contain braces. One pass, so a question that
    itself contains the text ``{answer}`` is not substituted again.
    """
    values = {"{question}": question, "{answer}": answer}
    return _PLACEHOLDER_RE.sub(lambda m: values[m.group(0)], template)
