"""A per-token alarm that holds its false-alarm rate: the threshold is set on neutral text at a
rate the user chooses, and the rate and the hit rate are measured on data the threshold and the
vector never saw.

* **Neutral text** is the shipped corpus (:func:`tlextract.ops.neutral.neutral_corpus`), read by
  the model as answers to neutral questions, split in two (:func:`corpus_split`): the threshold
  is the ``1 - rate`` quantile of the *calibration* half's token scores; the false-alarm rate is
  measured on the *held-out* half; its interval resamples the texts of both halves (a new
  threshold per draw), so it covers the threshold's own sampling error.
* **Hit rate (TPR)**: the share of the tokens of held-out pos responses above the threshold,
  cross-validated by example index: each fold's tokens are scored by a vector fitted on the other
  folds, whose threshold is set on the calibration half; interval over responses. The same for
  neg responses says how often the alarm fires on the opposite pole.
* **Formulation** (:class:`Formulation`): the method fitted (mean_diff, probe, ...), a causal
  running mean over the last ``window`` answer tokens, and the layer: fixed, or chosen by the
  alarm's own cross-validation (inside each outer fold, the layer with the highest TPR on the
  inner folds at the rate; neither the outer fold nor the held-out neutral half is used).
  Centring the projection on the neutral mean or standardising it per layer changes nothing once
  the threshold is a neutral quantile at a fixed layer (both are increasing affine maps), so
  they are not separate formulations here.

Scores are projections on the unit vector in activation units, as ``monitor`` records them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from tlextract.config import EVALUATION
from tlextract.errors import TLExtractError
from tlextract.ops.bootstrap import Interval, interval_of, ratio_interval
from tlextract.ops.folds import fold_of
from tlextract.ops.methods import run_method

DEFAULT_RATE = 0.05
N_BOOT = 1000
Tokens = Float[Tensor, "_token layer d_model"]  # "_": texts differ in length


@dataclass(frozen=True)
class TokenData:
    """What an alarm is fitted and measured on, at ``layers``: the kept responses pooled (for
    fitting vectors, as the extraction does) and token by token, and the two neutral halves."""

    layers: list[int]
    pooled_pos: Float[Tensor, "n_pos layer d_model"]
    pooled_neg: Float[Tensor, "n_neg layer d_model"]
    pos_index: list[int]  # example index of each pos row (folds are by example)
    neg_index: list[int]
    pos_tokens: list[Tokens]  # row i's answer tokens
    neg_tokens: list[Tokens]
    neutral_cal: list[Tokens]
    neutral_test: list[Tokens]


@dataclass(frozen=True)
class Formulation:
    method: str = "mean_diff"
    window: int = 1  # answer tokens in the causal running mean (1: the token alone)
    layer: int | None = None  # None: chosen by the alarm's own cross-validation

    def describe(self) -> str:
        where = "layer by its own CV" if self.layer is None else f"layer {self.layer}"
        return f"{self.method}, window {self.window}, {where}"


@dataclass(frozen=True)
class AlarmFigures:
    """A formulation's cross-validated figures at one rate."""

    formulation: Formulation
    rate: float
    tpr: Interval  # held-out pos response tokens above the threshold
    neg_rate: Interval  # held-out neg response tokens above it
    false_alarm: Interval  # held-out neutral tokens above it (the folds' thresholds)
    layers: list[int]  # the layer each outer fold used
    n_pos_tokens: int
    n_test_tokens: int


# Measured on smollm2_cognitive (docs/results.md, `python -m tlextract alarm`): a window of 8
# answer tokens at the layer the alarm's own CV picks gave the highest TPR at 5% on all four
# traits, at false-alarm rates within their intervals of 5%; a probe was no better.
DEFAULT_FORMULATION = Formulation("mean_diff", 8, None)
FORMULATIONS = (
    Formulation("mean_diff", 1, None),
    Formulation("mean_diff", 4, None),
    Formulation("mean_diff", 8, None),
    Formulation("probe", 1, None),
    Formulation("probe", 8, None),
)


def running_mean(scores: Float[Tensor, "token layer"], window: int) -> Float[Tensor, "token layer"]:
    """Token t's score averaged with the ``window - 1`` before it (fewer at the start)."""
    if window <= 1 or not len(scores):
        return scores
    c = torch.cat([scores.new_zeros(1, scores.shape[1]), scores.cumsum(0)])
    t = torch.arange(1, len(scores) + 1)
    lo = (t - window).clamp(min=0)
    return (c[t] - c[lo]) / (t - lo)[:, None]


def scores(
    texts: Sequence[Tokens], units: Float[Tensor, "layer d_model"], window: int
) -> list[Float[Tensor, "_token layer"]]:
    """Each text's token scores at every layer (projection on that layer's unit), windowed."""
    if not texts:
        return []
    flat = torch.einsum("tld,ld->tl", torch.cat(list(texts)), units)
    return [running_mean(s, window) for s in flat.split([len(x) for x in texts])]


def threshold_at_rate(values: Float[Tensor, " n"], rate: float) -> float:
    """The smallest cut with at most ``rate`` of ``values`` strictly above it: the k-th largest
    value, k = floor(rate * n) + 1 (ties can only lower the share above)."""
    if not len(values):
        raise TLExtractError("an alarm threshold needs neutral tokens; the corpus gave none.")
    k = min(math.floor(rate * len(values)) + 1, len(values))
    return float(values.topk(k).values[-1])


def _units(data: TokenData, method: str, rows: tuple[Tensor, Tensor], seed: int) -> Tensor:
    pos, neg = data.pooled_pos[rows[0]], data.pooled_neg[rows[1]]
    if not len(pos) or not len(neg):
        raise TLExtractError("an alarm fold has no pos or no neg response to fit on; extract "
                             "more examples or use fewer folds.")  # fmt: skip
    v = run_method(method, pos, neg, seed=seed).float()
    return v / v.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def _above(texts: list[Tensor], layer: int, threshold: float) -> tuple[list[int], list[int]]:
    """Per text: tokens above the threshold at ``layer``, and tokens."""
    return [int((s[:, layer] > threshold).sum()) for s in texts], [len(s) for s in texts]


def _rate_samples(
    cal: list[Tensor], test: list[Tensor], rate: float, n_boot: int, seed: int
) -> tuple[float, Tensor]:
    """The held-out rate of the threshold set on ``cal`` (per-text scores at one layer), and
    ``n_boot`` bootstrap draws of it that resample the calibration texts (a new threshold each
    time) and the held-out texts together: the threshold's own sampling error is in the
    interval, which matters when a window makes neighbouring scores alike."""
    gen = torch.Generator().manual_seed(seed)
    n_tok = torch.tensor([len(t) for t in test], dtype=torch.float64)
    flat = torch.cat(test)
    text_of = torch.repeat_interleave(torch.arange(len(test)), n_tok.long())
    cuts = [threshold_at_rate(torch.cat(cal), rate)]
    for _ in range(n_boot):
        picks = torch.randint(len(cal), (len(cal),), generator=gen).tolist()
        cuts.append(threshold_at_rate(torch.cat([cal[i] for i in picks]), rate))
    above = (flat[None, :] > torch.tensor(cuts)[:, None]).double()
    counts = torch.zeros(len(cuts), len(test), dtype=torch.float64).index_add_(1, text_of, above)
    draw = torch.randint(len(test), (n_boot, len(test)), generator=gen)
    samples = counts[1:].gather(1, draw).sum(1) / n_tok[draw].sum(1)
    return float(counts[0].sum() / n_tok.sum()), samples


def _thresholds(cal: list[Tensor], rate: float) -> list[float]:
    flat = torch.cat(cal)
    return [threshold_at_rate(flat[:, j], rate) for j in range(flat.shape[1])]


def _alarm_column(data: TokenData, f: Formulation, rate: float, fold: tuple[Tensor, Tensor],
                outer: int, folds: int, seed: int) -> int:  # fmt: skip
    """Column of the layer with the highest TPR at ``rate`` on the inner folds (outer fold
    excluded). The alarm's own decision (where a per-token alarm at a fixed false-alarm rate
    catches most), measured better than the vector's layer (``ops.folds.pick_layer``, which
    ranks whole-response AUROC); see docs/steering.md."""
    if f.layer is not None:
        if f.layer not in data.layers:
            raise TLExtractError(f"no layer {f.layer} in the alarm's data ({data.layers}).")
        return data.layers.index(f.layer)
    hits = torch.zeros(len(data.layers))
    total = 0
    for g in range(folds):
        if g == outer:
            continue
        train = ((fold[0] != outer) & (fold[0] != g), (fold[1] != outer) & (fold[1] != g))
        units = _units(data, f.method, train, seed)
        cuts = torch.tensor(_thresholds(scores(data.neutral_cal, units, f.window), rate))
        test = [t for t, k in zip(data.pos_tokens, fold[0].tolist(), strict=True) if k == g]
        for s in scores(test, units, f.window):
            hits += (s > cuts).sum(0)
            total += len(s)
    return int((hits / max(total, 1)).argmax())


def measure(
    data: TokenData,
    f: Formulation,
    rate: float = DEFAULT_RATE,
    folds: int = EVALUATION.folds,
    seed: int = 0,
) -> AlarmFigures:
    """Cross-validated TPR, neg rate and false-alarm rate of ``f`` at ``rate`` (module doc)."""
    if not 0 < rate < 1:
        raise TLExtractError(f"false-alarm rate {rate}: must be between 0 and 1.")
    fold = (fold_of(data.pos_index, folds, seed), fold_of(data.neg_index, folds, seed))
    pos: tuple[list[int], list[int]] = ([], [])
    neg: tuple[list[int], list[int]] = ([], [])
    n_neutral = [len(t) for t in data.neutral_test]
    layers = []
    fold_rates: list[tuple[float, Tensor]] = []
    for k in range(folds):
        column = _alarm_column(data, f, rate, fold, k, folds, seed)
        layers.append(data.layers[column])
        units = _units(data, f.method, (fold[0] != k, fold[1] != k), seed)
        cut = _thresholds(scores(data.neutral_cal, units, f.window), rate)[column]
        for side, tokens, which in ((pos, data.pos_tokens, fold[0]),
                                    (neg, data.neg_tokens, fold[1])):  # fmt: skip
            mine = [t for t, w in zip(tokens, which.tolist(), strict=True) if w == k]
            hit, n = _above(scores(mine, units, f.window), column, cut)
            side[0].extend(hit)
            side[1].extend(n)
        fold_rates.append(_rate_samples(
            [s[:, column] for s in scores(data.neutral_cal, units, f.window)],
            [s[:, column] for s in scores(data.neutral_test, units, f.window)],
            rate, N_BOOT, seed,
        ))  # fmt: skip
    # Each fold's alarm read the held-out neutral half: the rate is the mean over folds, its
    # draws the mean of the folds' draws (the same resampled texts, one seed).
    false_alarm = interval_of(sum(r for r, _ in fold_rates) / folds,
                            torch.stack([d for _, d in fold_rates]).mean(0), 0.95)  # fmt: skip
    return AlarmFigures(
        f, rate, ratio_interval(*pos), ratio_interval(*neg), false_alarm, layers,
        sum(pos[1]), sum(n_neutral),
    )  # fmt: skip


@dataclass(frozen=True)
class Alarm:
    """The alarm ``monitor`` uses for one trait: the full-data vector at ``layer``, its threshold
    from the calibration half, its false-alarm rate on the held-out half (``false_alarm``) and
    the cross-validated figures of the same formulation (``figures``)."""

    trait: str
    layer: int
    hook_name: str
    threshold: float
    false_alarm: Interval
    figures: AlarmFigures
    unit: tuple[float, ...]  # the unit vector at ``layer`` the threshold belongs to

    def unit_tensor(self) -> Float[Tensor, " d_model"]:
        return torch.tensor(self.unit)

    def above(self, token_scores: Sequence[float], is_prompt: Sequence[bool]) -> list[bool]:
        """Per token: an answer token whose windowed score is above the threshold (the window
        runs over answer tokens only, as on neutral text)."""
        answer = [s for s, p in zip(token_scores, is_prompt, strict=True) if not p]
        smoothed = running_mean(torch.tensor(answer, dtype=torch.float64)[:, None],
                                self.figures.formulation.window)[:, 0].tolist()  # fmt: skip
        flags = iter(s > self.threshold for s in smoothed)
        return [False if p else next(flags) for p in is_prompt]

    def describe(self) -> str:
        f = self.figures
        return (
            f"{self.trait} (L{self.layer}, {f.formulation.method}, window "
            f"{f.formulation.window}): alarm at {f.rate:.0%} false alarms, threshold "
            f"{self.threshold:.4g}; on held-out neutral text {self.false_alarm:.3f}; "
            f"cross-validated TPR on pos tokens {f.tpr:.2f}, on neg tokens {f.neg_rate:.2f}"
        )


def fit_alarm(
    data: TokenData, trait: str, hook_names: Sequence[str], figures: AlarmFigures, seed: int = 0
) -> Alarm:
    """The alarm of ``figures``' formulation fitted on all the data: at its fixed layer, or at
    the layer its outer folds chose most often (the lower on a tie)."""
    f = figures.formulation
    layer = f.layer if f.layer is not None else max(
        sorted(set(figures.layers)), key=figures.layers.count
    )  # fmt: skip
    column = data.layers.index(layer)
    every = (torch.ones(len(data.pos_index), dtype=torch.bool),
             torch.ones(len(data.neg_index), dtype=torch.bool))  # fmt: skip
    units = _units(data, f.method, every, seed)
    cal = [s[:, column] for s in scores(data.neutral_cal, units, f.window)]
    cut = threshold_at_rate(torch.cat(cal), figures.rate)
    test = [s[:, column] for s in scores(data.neutral_test, units, f.window)]
    value, draws = _rate_samples(cal, test, figures.rate, N_BOOT, seed)
    return Alarm(trait, layer, hook_names[column], cut, interval_of(value, draws, 0.95), figures,
                 tuple(units[column].tolist()))  # fmt: skip
