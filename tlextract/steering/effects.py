"""Who a steering vector fails, and what else it moves: the per-question view of ``steer --auto``.

A mean shift hides the inputs that move the wrong way (Tan et al. 2024, arXiv 2407.12404) and
the behaviours moved besides the target (SteeringSafety 2025, arXiv 2509.13450). For the chosen
setting, on the report questions, each condition (the trait vector, the random direction) gets:

* **wrong-way share**: the fraction of questions whose answer's P(pole) fell below the
  unsteered answer's (same question, same seed), with a bootstrap interval over questions. A
  direction that does nothing but perturb the text moves about half each way: compare with the
  random direction's share, not with zero.
* **side effects**: the shift of every trait's own classifier (P of that trait's pos pole) on
  the same answers, paired per question: one row of the trait x trait table
  (:func:`side_effect_table`).
* **neutral fluency**: the fall in log-probability per token, under the unsteered model, of the
  answers to neutral questions, steered against unsteered (paired per question).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from tlextract.errors import TLExtractError
from tlextract.evaluation.surface import TextScorer
from tlextract.ops.bootstrap import Interval, mean_interval


@dataclass(frozen=True)
class QuestionEffects:
    """One condition against the unsteered answers to the same questions."""

    wrong_way: Interval  # share of questions moved away from the pole
    side_effects: dict[str, Interval]  # trait -> shift in P(that trait's pos pole)
    neutral_logprob_drop: Interval | None  # unsteered minus steered, nats/token (None: not run)


def paired(base: Sequence[float], other: Sequence[float]) -> list[float]:
    if len(base) != len(other) or not base:
        raise TLExtractError(f"paired shifts need equal, non-empty lists ({len(base)}, "
                             f"{len(other)}).")  # fmt: skip
    return [b - a for a, b in zip(base, other, strict=True)]


def wrong_way_share(base: Sequence[float], steered: Sequence[float]) -> Interval:
    """Share of questions whose P(pole) fell (strictly: an unchanged answer moved no way)."""
    return mean_interval([1.0 if d < 0 else 0.0 for d in paired(base, steered)])


def side_effects(
    classifiers: Mapping[str, TextScorer], base: Sequence[str], steered: Sequence[str]
) -> dict[str, Interval]:
    """Per trait: mean paired shift of its classifier's P(pos) from ``base`` to ``steered``."""
    return {
        trait: mean_interval(paired(clf.prob_pos(base), clf.prob_pos(steered)))
        for trait, clf in classifiers.items()
    }


def question_effects(
    p_base: Sequence[float],
    p_steered: Sequence[float],
    classifiers: Mapping[str, TextScorer],
    texts: tuple[Sequence[str], Sequence[str]],
    neutral_logprobs: tuple[Sequence[float | None], Sequence[float | None]] | None,
) -> QuestionEffects:
    """``p_*``: P(pole) per report question; ``texts``: (unsteered, steered) answers;
    ``neutral_logprobs``: (unsteered, steered) mean log-prob per token of each neutral answer
    under the unsteered model."""
    drop = None
    if neutral_logprobs is not None:
        pairs = [(a, b) for a, b in zip(*neutral_logprobs, strict=True) if None not in (a, b)]
        if pairs:
            drop = mean_interval([a - b for a, b in pairs])  # type: ignore[operator]
    return QuestionEffects(
        wrong_way_share(p_base, p_steered), side_effects(classifiers, *texts), drop
    )


def side_effect_table(rows: Mapping[str, Mapping[str, Interval]]) -> list[str]:
    """Markdown: steered trait down, classifier across; each cell the shift in P(pos) of the
    column trait with its interval, bold where the interval excludes zero."""
    columns = sorted({c for row in rows.values() for c in row})
    lines = [
        "| steered \\ classifier | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for steered, row in rows.items():
        cells = []
        for c in columns:
            s = row.get(c)
            text = "-" if s is None else format(s, "+.2f")
            cells.append(f"**{text}**" if s is not None and (s.low > 0 or s.high < 0) else text)
        lines.append(f"| {steered} | " + " | ".join(cells) + " |")
    return lines
