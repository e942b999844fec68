"""Calibrated monitoring: per trait, a threshold on the projection with a known error rate.

A per-token score of :func:`tlextract.ops.monitor.monitor` is a projection in activation units;
on its own it says nothing about how trait-like a token is. :func:`calibrate` gives it a cut:

* **Threshold.** The run's kept responses are projected out of fold (:func:`held_out_projections`:
  each one by a vector fitted on the other folds, so none is scored by a vector that saw it) and
  the threshold is the cut that best separates pos from neg (:func:`best_threshold`). TPR and TNR
  at that cut are therefore held-out figures.
* **False alarms.** Neutral text (:data:`tlextract.ops.neutral.NEUTRAL_TEXTS`) is read by the
  model as an answer to a neutral question and every answer token is scored as ``monitor`` scores
  it (:func:`neutral_token_scores`): the fraction of tokens above the threshold is the token-level
  false-alarm rate. The threshold is set on response-averaged activations while monitoring scores
  single tokens, which spread more; so the token rate is measured, not assumed, and the rate for
  whole texts (mean over a text's answer tokens, as the threshold was set) is given beside it.

A score is "above the threshold" when strictly greater (:meth:`Calibration.above`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from statistics import fmean

import torch
from jaxtyping import Float
from torch import Tensor

from tlextract.config import EVALUATION
from tlextract.errors import TLExtractError
from tlextract.evaluation.heldout import KeptRun, load_kept
from tlextract.model.decoding import Model, teacher_forced
from tlextract.model.tokens import device_of, tokenizer_of
from tlextract.ops.fluency import neutral_answers
from tlextract.ops.folds import fold_of
from tlextract.ops.methods import run_method
from tlextract.ops.metrics import project
from tlextract.ops.neutral import NEUTRAL_TEXTS
from tlextract.ops.pool import pack
from tlextract.ops.steer import unit_direction
from tlextract.ops.trait_vectors import TraitVectors
from tlextract.settings import RunSettings


@dataclass(frozen=True)
class Calibration:
    """A trait's threshold at one layer, its held-out TPR/TNR and its false alarms on neutral
    text (fractions of answer tokens, and of texts by their mean answer-token score)."""

    trait: str
    layer: int
    hook_name: str
    threshold: float
    tpr: float
    tnr: float
    n_pos: int
    n_neg: int
    false_alarm_tokens: float
    false_alarm_texts: float
    n_neutral_tokens: int
    n_neutral_texts: int

    def above(self, scores: Sequence[float], is_prompt: Sequence[bool] | None = None) -> list[bool]:
        """Per token: score above the threshold (``is_prompt`` is accepted for the monitor
        view's sake; prompt tokens are dropped there)."""
        return [s > self.threshold for s in scores]

    def describe(self) -> str:
        return (
            f"{self.trait} (L{self.layer}): threshold {self.threshold:.4g} (held-out TPR "
            f"{self.tpr:.2f}, TNR {self.tnr:.2f}); false alarms on neutral text: "
            f"{self.false_alarm_tokens:.1%} of tokens, {self.false_alarm_texts:.0%} of texts"
        )


def held_out_projections(
    kept: KeptRun,
    layer: int,
    folds: int = EVALUATION.folds,
    seed: int = 0,
    method: str = "mean_diff",
) -> tuple[list[float], list[float]]:
    """(pos, neg) out-of-fold projections at ``layer``, in the rows' order: each fold (by example
    index, :func:`fold_of`) projected on the unit vector ``method`` fits on the other folds.
    Raw activation units, the scale of ``monitor``'s per-token scores."""
    acts = kept.acts
    if layer not in acts.layers:
        raise TLExtractError(
            f"the kept activations have no layer {layer}; they have {list(acts.layers)}."
        )
    column = acts.layers.index(layer)
    x = torch.cat([acts.pos, acts.neg])[:, column : column + 1]
    y = torch.tensor([True] * len(acts.pos_index) + [False] * len(acts.neg_index))
    fold = fold_of([*acts.pos_index, *acts.neg_index], folds, seed)
    proj = torch.empty(len(y))
    for f in range(folds):
        test = fold == f
        pos, neg = x[~test & y], x[~test & ~y]
        if not len(pos) or not len(neg):
            raise TLExtractError(
                f"calibration: the folds other than fold {f} have no pos or no neg response; "
                "extract more examples or use fewer folds (folds=).",
                parameters=("folds",),
            )
        proj[test] = project(x[test], run_method(method, pos, neg, seed=seed))[:, 0]
    return proj[y].tolist(), proj[~y].tolist()


def best_threshold(pos: Sequence[float], neg: Sequence[float]) -> tuple[float, float, float]:
    """(threshold, TPR, TNR): the cut maximising balanced accuracy (TPR + TNR) / 2, a score
    being called pos when it is above the cut. Cuts are midpoints between adjacent distinct
    values; among equally good ones the lowest wins (all values equal: that value)."""
    if not pos or not neg:
        raise TLExtractError(
            f"a threshold needs pos and neg scores (got {len(pos)} pos, {len(neg)} neg)."
        )
    scores = torch.tensor([*pos, *neg], dtype=torch.float64)
    order = scores.argsort(stable=True)
    s = scores[order]
    is_pos = (order < len(pos)).long()
    # Per cut after sorted value i: pos above it and neg at or below it, weighted so that the
    # sum is balanced accuracy * 2 * n_pos * n_neg in integers (ties compare exactly).
    merit = (len(pos) - is_pos.cumsum(0)[:-1]) * len(neg) + (1 - is_pos).cumsum(0)[:-1] * len(pos)
    merit[s[1:] == s[:-1]] = -1  # no cut between equal values
    if not len(merit) or int(merit.max()) < 0:
        threshold = float(s[0])
    else:
        i = int(merit.argmax())  # the first maximum: the lowest cut
        threshold = float((s[i] + s[i + 1]) / 2)
    return threshold, fmean(p > threshold for p in pos), fmean(n <= threshold for n in neg)


@torch.inference_mode()
def neutral_token_scores(
    model: Model,
    unit: Float[Tensor, " d_model"],
    name: str,
    style: str,
    texts: Sequence[str] = NEUTRAL_TEXTS,
    batch_size: int = 8,
) -> list[list[float]]:
    """Per text, the projection of ``name``'s output on ``unit`` at each answer token, from a
    teacher-forced pass of the model as it is, each text the answer to a neutral question
    (:func:`tlextract.ops.fluency.neutral_answers`)."""
    tok = tokenizer_of(model)
    prompt_ids, response_ids = neutral_answers(model, style, texts)
    scores: list[list[float]] = []
    for start in range(0, len(texts), batch_size):
        chunk = slice(start, start + batch_size)
        tokens, attn, response = pack(
            prompt_ids[chunk], response_ids[chunk], tok.pad_token_id, device_of(model)
        )
        _, acts = teacher_forced(model, tokens, attn, [name])
        proj = (acts[name].float() @ unit.to(acts[name].device).float()).cpu()
        scores += [row[mask].tolist() for row, mask in zip(proj, response.cpu(), strict=True)]
    return scores


def false_alarms(scores: Sequence[Sequence[float]], threshold: float) -> tuple[float, float]:
    """Fractions of tokens, and of texts by their mean token score, above ``threshold``."""
    flat = [s for text in scores for s in text]
    return fmean(s > threshold for s in flat), fmean(fmean(t) > threshold for t in scores)


def calibrate(
    model: Model,
    run: RunSettings,
    vectors: TraitVectors,
    layer: int,
    folds: int = EVALUATION.folds,
    seed: int = 0,
) -> Calibration:
    """The calibration of ``vectors`` at ``layer`` (see the module docstring).

    Neutral text is scored by the saved full-data vector, the one ``monitor`` uses; the
    threshold comes from out-of-fold vectors of the same method on the run's kept responses,
    whose directions are close to it (each is fitted on (folds - 1) / folds of the data)."""
    kept = load_kept(run)
    if kept.acts.hook != vectors.hook:
        raise TLExtractError(
            f"{vectors.hook} vectors cannot be calibrated on {kept.acts.hook} activations."
        )
    pos, neg = held_out_projections(kept, layer, folds, seed, vectors.method)
    threshold, tpr, tnr = best_threshold(pos, neg)
    name, unit = unit_direction(model, vectors, layer)
    neutral = neutral_token_scores(model, unit, name, run.experiment.prompt_style)
    tokens, texts = false_alarms(neutral, threshold)
    return Calibration(
        trait=run.trait.name,
        layer=layer,
        hook_name=name,
        threshold=threshold,
        tpr=tpr,
        tnr=tnr,
        n_pos=len(pos),
        n_neg=len(neg),
        false_alarm_tokens=tokens,
        false_alarm_texts=texts,
        n_neutral_tokens=sum(map(len, neutral)),
        n_neutral_texts=len(neutral),
    )
