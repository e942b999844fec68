"""The judge cache and judging (question, answer) pairs through it.

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
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tlextract.errors import TLExtractError
from tlextract.judge.base import (
    COHERENCE_PROMPT,
    Judge,
    Judgment,
    Score,
    check_template,
    fill_prompt,
)

log = logging.getLogger(__name__)


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
