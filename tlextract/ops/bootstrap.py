"""Confidence intervals for held-out figures: the percentile bootstrap over *examples*.

A pos row and a neg row with the same example index share a question (or a matched topic), so
they are not independent draws: the bootstrap resamples example indices with replacement and
every row of a drawn example comes along (as many times as it was drawn). Each resample is a
vector of counts per row, so all resamples are scored at once as weighted statistics, which are
exactly the statistics of the duplicated rows.

Scores are standardised decision scores: positive means "predicted pos" (see
:func:`tlextract.ops.folds.standardize`), so accuracy is the balanced accuracy of ``score > 0``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from einops import einsum
from jaxtyping import Bool, Float, Real
from torch import Tensor

from tlextract.config import EVALUATION
from tlextract.errors import TLExtractError

FIGURES = ("accuracy", "auroc", "cohens_d")


@dataclass(frozen=True)
class Interval:
    """A point estimate and its percentile-bootstrap interval at ``level``."""

    value: float
    low: float
    high: float

    def covers(self, x: float) -> bool:
        return self.low <= x <= self.high

    def above(self, other: Interval) -> bool:
        """Whole interval above ``other``'s (no overlap)."""
        return self.low > other.high

    def __format__(self, spec: str) -> str:
        spec = spec or ".2f"
        return f"{self.value:{spec}} [{self.low:{spec}}, {self.high:{spec}}]"


def weighted_figures(
    pos: Float[Tensor, " n_pos"],
    neg: Float[Tensor, " n_neg"],
    w_pos: Real[Tensor, "b n_pos"],
    w_neg: Real[Tensor, "b n_neg"],
) -> dict[str, Float[Tensor, " b"]]:
    """Balanced accuracy of ``score > 0``, AUROC (ties half) and Cohen's d (pooled, unbiased
    variances) of each row of weights: integer weights give the figures of the duplicated rows."""
    p, q, wp, wn = pos.double(), neg.double(), w_pos.double(), w_neg.double()
    sp, sn = wp.sum(-1), wn.sum(-1)
    accuracy = ((wp * (p > 0)).sum(-1) / sp + (wn * (q <= 0)).sum(-1) / sn) / 2
    wins = (p[:, None] > q[None]).double() + 0.5 * (p[:, None] == q[None]).double()
    auroc = einsum(wp, wins, wn, "b p, p n, b n -> b") / (sp * sn)
    mp, mn = (wp * p).sum(-1) / sp, (wn * q).sum(-1) / sn
    within = (wp * (p - mp[:, None]) ** 2).sum(-1) + (wn * (q - mn[:, None]) ** 2).sum(-1)
    sd = (within / (sp + sn - 2).clamp(min=1)).sqrt()
    gap = mp - mn
    d = torch.where(sd > 0, gap / torch.where(sd > 0, sd, 1.0), gap.sign() * math.inf)
    return {"accuracy": accuracy, "auroc": auroc, "cohens_d": d.nan_to_num(0.0)}


def bootstrap(
    pos: Float[Tensor, " n_pos"],
    neg: Float[Tensor, " n_neg"],
    pos_groups: Sequence[int],
    neg_groups: Sequence[int],
    n_boot: int = EVALUATION.n_boot,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Interval]:
    """Accuracy, AUROC and Cohen's d of the scores, each with a percentile interval from
    ``n_boot`` resamples of the example indices (``pos_groups[i]`` is row ``i``'s example)."""
    if len(pos) == 0 or len(neg) == 0:
        raise TLExtractError(
            f"bootstrap: needs scores on both sides (got {len(pos)} pos, {len(neg)} neg)."
        )
    if not 0 < level < 1 or n_boot < 1:
        raise TLExtractError(f"bootstrap: level in (0, 1) and n_boot >= 1 (got {level}, {n_boot}).")
    groups = sorted(set(pos_groups) | set(neg_groups))
    slot = {g: i for i, g in enumerate(groups)}
    gen = torch.Generator().manual_seed(seed)
    draws = torch.randint(len(groups), (n_boot, len(groups)), generator=gen)
    counts = torch.zeros(n_boot, len(groups), dtype=torch.float64)
    counts.scatter_add_(1, draws, torch.ones_like(draws, dtype=torch.float64))
    w_pos = counts[:, [slot[g] for g in pos_groups]]
    w_neg = counts[:, [slot[g] for g in neg_groups]]
    # A resample with no row on one side has no figure: left out (rare past a few examples).
    ok = (w_pos.sum(-1) > 0) & (w_neg.sum(-1) > 0)
    boot = weighted_figures(pos, neg, w_pos[ok], w_neg[ok])
    point = weighted_figures(pos, neg, torch.ones(1, len(pos)), torch.ones(1, len(neg)))
    return {name: interval_of(float(point[name][0]), boot[name], level) for name in FIGURES}


def bootstrap_rows(
    scores: Float[Tensor, " n"],
    y: Bool[Tensor, " n"],
    groups: Sequence[int],
    n_boot: int = EVALUATION.n_boot,
    seed: int = 0,
) -> dict[str, Interval]:
    """:func:`bootstrap` of the pos rows (``y``) against the others, ``groups[i]`` being row
    ``i``'s example."""
    g = torch.tensor(list(groups))
    return bootstrap(scores[y], scores[~y], g[y].tolist(), g[~y].tolist(), n_boot, seed)


def interval_of(value: float, samples: Float[Tensor, " b"], level: float) -> Interval:
    """``value`` with the central ``level`` percentile interval of ``samples``."""
    tail = (1 - level) / 2
    lo, hi = torch.quantile(samples, torch.tensor([tail, 1 - tail], dtype=torch.float64))
    return Interval(value, float(lo), float(hi))


def mean_interval(
    values: Sequence[float], n_boot: int = EVALUATION.n_boot, seed: int = 0, level: float = 0.95
) -> Interval:
    """Mean of ``values`` (one per independent unit, e.g. a question's paired difference) with
    a percentile-bootstrap interval."""
    if not values:
        raise TLExtractError("mean_interval: no values.")
    x = torch.tensor(list(values), dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    means = x[torch.randint(len(x), (n_boot, len(x)), generator=gen)].mean(-1)
    return interval_of(float(x.mean()), means, level)


def ratio_interval(
    counts: Sequence[int | float], totals: Sequence[int | float], n_boot: int = 2000, seed: int = 0,
    level: float = 0.95,
) -> Interval:  # fmt: skip
    """sum(counts) / sum(totals) with a percentile-bootstrap interval over units (one count and
    total per text or response: tokens of one text are not independent draws)."""
    if len(counts) != len(totals) or not counts or sum(totals) <= 0:
        raise TLExtractError(
            f"ratio_interval: {len(counts)} counts, {len(totals)} totals, sum {sum(totals)}."
        )
    c = torch.tensor(list(counts), dtype=torch.float64)
    t = torch.tensor(list(totals), dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    draw = torch.randint(len(c), (n_boot, len(c)), generator=gen)
    ratios = c[draw].sum(-1) / t[draw].sum(-1).clamp(min=1e-12)
    return interval_of(float(c.sum() / t.sum()), ratios, level)
