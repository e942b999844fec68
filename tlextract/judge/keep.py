"""Keep the clear cases: judge every response, keep positives that show the trait and negatives
that lack it (persona_vectors' rule), and summarise what was kept."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import mean
from typing import Any

from tlextract.config import split_judge
from tlextract.errors import TLExtractError
from tlextract.judge.answers import JudgeCache, judge_responses
from tlextract.judge.base import Judge, Judgment, passes_filter
from tlextract.judge.registry import make_judge
from tlextract.traits import POLARITIES


@dataclass(frozen=True)
class Selection:
    """Example indices kept per polarity, each example's judgment, and a summary for people."""

    kept: dict[str, list[int]]
    judgments: list[dict[str, Any]]
    summary: dict[str, Any]


def select(
    rows: Sequence[dict[str, Any]],
    eval_prompt: str,
    config: dict[str, Any],
    cache_path: Path,
    get_model: Callable[[], Any],
    where: str,
    given: Judge | None = None,
) -> Selection:
    """Judge ``rows`` (response records) and apply the keep rule. Empty responses are never kept.
    ``where`` names the place to fix settings in error messages; ``given``: the caller's judge
    (then ``config`` holds only its name and the keep rules)."""
    judge_config, rules = split_judge(config)
    judge = given if given is not None else _judge_of(judge_config, get_model)
    if judge is None:
        judgments = [Judgment(trait=None, coherence=None) for _ in rows]
        keep = [r["n_response_tokens"] > 0 for r in rows]
    else:
        judgments = judge_responses(
            judge,
            eval_prompt,
            [r["question"] for r in rows],
            [r["response"] for r in rows],
            cache=JudgeCache(cache_path),
        )
        failed = sum(j.failed for j in judgments)
        if failed:
            raise TLExtractError(
                f"{failed} of {len(rows)} judgments failed (see the warnings above). Nothing "
                "was counted; rerun to retry them: answered calls are cached and not repeated."
            )
        keep = [
            r["n_response_tokens"] > 0
            and passes_filter(j, r["polarity"] == "pos", rules["threshold"], rules["min_coherence"])
            for r, j in zip(rows, judgments, strict=True)
        ]
    kept: dict[str, list[int]] = {
        p: [r["index"] for r, k in zip(rows, keep, strict=True) if k and r["polarity"] == p]
        for p in POLARITIES
    }
    summary = _summary(rows, judgments, kept, judge.name if judge else "none", rules)
    short = [p for p in POLARITIES if len(kept[p]) < (rules["min_kept"] if judge else 1)]
    if short:
        raise TLExtractError(
            f"{where}: only {len(kept[short[0]])} {short[0]} responses kept (judge 'min_kept' is "
            f"{rules['min_kept']}; kept {summary['kept']}, mean trait score "
            f"{summary['mean_score']}). Try more examples (--n-examples), a lower judge "
            "'threshold', a stronger judge (an API model), clearer instructions, or --judge none "
            "to keep everything."
        )
    records = [
        {"polarity": r["polarity"], "index": r["index"], "trait": j.trait,
         "coherence": j.coherence, "kept": k}
        for r, j, k in zip(rows, judgments, keep, strict=True)
    ]  # fmt: skip
    return Selection(kept=kept, judgments=records, summary=summary)


def _judge_of(config: dict[str, Any], get_model: Callable[[], Any]) -> Judge | None:
    """The configured judge (None: keep every non-empty response); the studied model is
    loaded only for a local judge that scores with it."""
    needs_model = config.get("kind", "none") == "local" and config.get("model", "self") == "self"
    return make_judge(config, model=get_model() if needs_model else None)


def _summary(
    rows: Sequence[dict[str, Any]],
    judgments: Sequence[Judgment],
    kept: dict[str, list[int]],
    judge_name: str,
    rules: dict[str, Any],
) -> dict[str, Any]:
    def scores(pol: str) -> list[float]:
        return [
            j.trait
            for r, j in zip(rows, judgments, strict=True)
            if r["polarity"] == pol and j.trait is not None
        ]

    return {
        "judge": judge_name,
        "rules": rules,
        "generated": {p: sum(r["polarity"] == p for r in rows) for p in POLARITIES},
        "judged": {p: len(scores(p)) for p in POLARITIES},
        "missing": {
            p: sum(
                r["polarity"] == p and j.trait is None for r, j in zip(rows, judgments, strict=True)
            )
            for p in POLARITIES
        }
        if judge_name != "none"
        else {p: 0 for p in POLARITIES},
        "kept": {p: len(kept[p]) for p in POLARITIES},
        "mean_score": {p: round(mean(scores(p)), 2) if scores(p) else None for p in POLARITIES},
    }
