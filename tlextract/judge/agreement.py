"""How well does a local judge agree with the instruction polarity? Measured, not assumed.

For every trait and variant with responses, the local judge (the studied model by default) reads
each response with the trait's eval prompt; from its exact distribution over 0-100 we take the
mass on numbers and the probability-weighted score. Reported per run: the median mass, how many
judgments would be missing at the configured ``min_mass``, the mean score per polarity, and the
AUROC of the score between pos and neg responses (0.5 = no agreement), both over the judgments
that are not missing and over all of them (renormalised, as if ``min_mass`` were 0).

``python -m tlextract agreement --experiment smollm2_cognitive --variant all`` writes
``experiments/<exp>/report/judge_agreement.{md,json}``.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tlextract.judge.base import fill_prompt
from tlextract.judge.local import LocalJudge
from tlextract.ops.metrics import auroc


@dataclass(frozen=True)
class Agreement:
    trait: str
    variant: str
    n: dict[str, int]
    median_mass: float
    missing: dict[str, int]  # at min_mass
    mean_score: dict[str, float | None]  # over judgments that are not missing
    auroc: float | None  # over judgments that are not missing (None: a side has none)
    auroc_all: float  # every judgment, renormalised over 0-100 whatever its mass


def _auroc(pos: list[float], neg: list[float]) -> float | None:
    if not pos or not neg:
        return None
    return float(auroc(torch.tensor(pos)[:, None], torch.tensor(neg)[:, None])[0])


def measure(
    judge: LocalJudge, eval_prompt: str, rows: Sequence[dict], trait: str, variant: str
) -> Agreement:
    """Agreement of ``judge`` with the polarity of ``rows`` (response records)."""
    rows = [r for r in rows if r["n_response_tokens"] > 0]
    probs = judge.number_probs(
        [fill_prompt(eval_prompt, r["question"], r["response"]) for r in rows]
    )
    valid = ~probs.isnan().any(dim=-1)  # a NaN row: the prompt did not fit the context
    probs = probs.nan_to_num(0.0)
    mass = probs.sum(dim=-1)
    scores = (probs @ torch.arange(101, dtype=probs.dtype)) / mass.clamp_min(1e-300)
    kept = valid & (mass >= judge.min_mass)
    by = {p: [i for i, r in enumerate(rows) if r["polarity"] == p] for p in ("pos", "neg")}

    def values(pol: str, only_kept: bool) -> list[float]:
        return [float(scores[i]) for i in by[pol] if (kept[i] if only_kept else valid[i])]

    return Agreement(
        trait=trait,
        variant=variant,
        n={p: len(ix) for p, ix in by.items()},
        median_mass=float(mass.median()),
        missing={p: sum(not bool(kept[i]) for i in ix) for p, ix in by.items()},
        mean_score={
            p: round(statistics.fmean(values(p, True)), 1) if values(p, True) else None for p in by
        },
        auroc=_auroc(values("pos", True), values("neg", True)),
        auroc_all=float(_auroc(values("pos", False), values("neg", False)) or 0.5),
    )


def markdown(results: Sequence[Agreement], judge_name: str, min_mass: float) -> str:
    def fmt(x: float | None) -> str:
        return "-" if x is None else f"{x:.2f}"

    lines = [
        f"Judge `{judge_name}`; missing = under {min_mass:g} of its probability on 0-100.",
        "",
        "| trait | variant | responses pos/neg | median mass on 0-100 | missing pos/neg | "
        "mean score pos/neg | AUROC (not missing) | AUROC (all, renormalised) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {a.trait} | {a.variant} | {a.n['pos']}/{a.n['neg']} | {a.median_mass:.2f} | "
        f"{a.missing['pos']}/{a.missing['neg']} | {fmt(a.mean_score['pos'])} / "
        f"{fmt(a.mean_score['neg'])} | {fmt(a.auroc)} | {a.auroc_all:.2f} |"
        for a in results
    ]
    return "\n".join(lines) + "\n"
