"""Instruction vs natural elicitation, side by side: each variant's own held-out figures, the
cross-distribution figures (vectors of one variant scored on the other's held-out responses), and
surface baselines (response length, bag of words) on the very same held-out split, so a vector
that is no better than a surface feature shows as such.

Every figure uses the split of :func:`tlextract.evaluation.evaluate.split_examples` over the
examples the judge kept and the activations stage pooled (non-empty responses), so the columns
compare directly with ``report/metrics.json``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from tlextract.config import EVALUATION
from tlextract.errors import TLExtractError
from tlextract.evaluation.evaluate import TraitEvaluation, cross_evaluate
from tlextract.evaluation.heldout import load_kept, split_examples
from tlextract.evaluation.surface import TextClassifier
from tlextract.ops.metrics import LayerMetrics, auroc, midpoint_accuracy
from tlextract.settings import RunSettings
from tlextract.stages.activations import Activations
from tlextract.stages.responses import load_responses

METHOD = "mean_diff"


@dataclass(frozen=True)
class Baseline:
    """Held-out balanced accuracy (midpoint of the train class means) and AUROC of a score
    computed from the response text alone; NaN when the texts cannot give it (no words)."""

    accuracy: float
    auroc: float

    def __format__(self, spec: str) -> str:
        if math.isnan(self.auroc):
            return "n/a (no words)"
        return f"{self.accuracy:.2f} / {self.auroc:.2f}"


@dataclass(frozen=True)
class VariantFigures:
    variant: str
    layer: int  # best mean_diff layer on the variant's own held-out split
    accuracy: float
    auroc: float
    cohens_d: float
    length: Baseline
    bag_of_words: Baseline
    n_test: dict[str, int]


@dataclass(frozen=True)
class Transfer:
    """Vectors fitted on ``source``'s train split, scored at ``source``'s best layer on
    ``target``'s held-out split."""

    source: str
    target: str
    layer: int
    accuracy: float
    auroc: float
    cohens_d: float


@dataclass(frozen=True)
class TraitComparison:
    trait: str
    variants: dict[str, VariantFigures]
    transfers: list[Transfer]


def _score_baseline(
    train_pos: Float[Tensor, "n_tp 1"],
    train_neg: Float[Tensor, "n_tn 1"],
    test_pos: Float[Tensor, "n_ep 1"],
    test_neg: Float[Tensor, "n_en 1"],
) -> Baseline:
    # Orient by the train means, as midpoint_accuracy does, so AUROC never peeks at test labels.
    sign = 1.0 if float(train_pos.mean()) >= float(train_neg.mean()) else -1.0
    return Baseline(
        accuracy=float(midpoint_accuracy(train_pos, train_neg, test_pos, test_neg)[0]),
        auroc=float(auroc(sign * test_pos, sign * test_neg)[0]),
    )


def surface_baselines(
    run: RunSettings, test_fraction: float = EVALUATION.test_fraction, seed: int = 0
) -> tuple[Baseline, Baseline]:
    """(response length in tokens, bag-of-words logistic regression) on ``run``'s split: the
    saved kept activations and responses, see :func:`split_baselines`."""
    responses, _ = load_responses(run)
    return split_baselines(load_kept(run).acts, responses, test_fraction, seed)


def split_baselines(
    acts: Activations,
    responses: Iterable[Mapping[str, Any]],
    test_fraction: float = EVALUATION.test_fraction,
    seed: int = 0,
) -> tuple[Baseline, Baseline]:
    """(response length in tokens, bag-of-words logistic regression) on the held-out split of
    ``acts``' examples; ``responses``: the records they were pooled over (polarity, index,
    response, n_response_tokens, as the responses stage writes them)."""
    rows = {(r["polarity"], r["index"]): r for r in responses}
    split = split_examples(acts.pos_index, acts.neg_index, test_fraction, seed)

    def pick(pol: str, index: list[int], chosen: list[int]) -> list[Mapping[str, Any]]:
        return [rows[(pol, index[r])] for r in chosen]

    sides = {
        "train_pos": pick("pos", acts.pos_index, split.pos_train),
        "train_neg": pick("neg", acts.neg_index, split.neg_train),
        "test_pos": pick("pos", acts.pos_index, split.pos_test),
        "test_neg": pick("neg", acts.neg_index, split.neg_test),
    }
    length = _score_baseline(
        *(torch.tensor([[float(r["n_response_tokens"])] for r in s]) for s in sides.values())
    )
    try:
        clf = TextClassifier(
            [r["response"] for r in sides["train_pos"] + sides["train_neg"]],
            [True] * len(sides["train_pos"]) + [False] * len(sides["train_neg"]),
        )
    except TLExtractError:  # no words to count: unavailable, shown as n/a
        return length, Baseline(math.nan, math.nan)

    def bow(side: list[Mapping[str, Any]]) -> Tensor:
        scores = clf.decision([r["response"] for r in side])
        return torch.tensor(scores, dtype=torch.float32)[:, None]

    return length, _score_baseline(*(bow(s) for s in sides.values()))


def _at(ev: TraitEvaluation, layer: int) -> LayerMetrics:
    return next(r for r in ev.rows if r.method == METHOD and r.layer == layer)


def compare_variants(
    runs: dict[str, RunSettings],
    evaluations: dict[str, TraitEvaluation],
    test_fraction: float = EVALUATION.test_fraction,
    seed: int = 0,
) -> TraitComparison:
    """The figures of one trait for each variant in ``runs`` (keyed by variant), with both
    transfer directions when there are two variants."""
    figures = {}
    for variant, run in runs.items():
        best = evaluations[variant].best[METHOD]
        length, words = surface_baselines(run, test_fraction, seed)
        figures[variant] = VariantFigures(
            variant, best.layer, best.accuracy, best.auroc, best.cohens_d, length, words,
            evaluations[variant].n_test,
        )  # fmt: skip
    transfers = []
    for source, target in ((a, b) for a in runs for b in runs if a != b):
        ev = cross_evaluate(
            runs[source],
            runs[target],
            [METHOD],
            test_fraction,
            seed,
            layers={METHOD: figures[source].layer},
        )
        m = _at(ev, figures[source].layer)
        transfers.append(Transfer(source, target, m.layer, m.accuracy, m.auroc, m.cohens_d))
    trait = next(iter(runs.values())).trait.name
    return TraitComparison(trait, figures, transfers)


def comparison_markdown(comparisons: Sequence[TraitComparison]) -> list[str]:
    """The variants table and the transfer table, as markdown lines."""
    lines = [
        "## Instruction vs natural elicitation (mean_diff)",
        "",
        "Held-out balanced accuracy / AUROC / Cohen's d at each variant's best layer, next to "
        "two surface baselines on the same held-out responses (accuracy / AUROC): the response "
        "length in tokens, and a bag-of-words logistic regression on the response text.",
        "",
        "| trait | variant | best layer | accuracy | AUROC | Cohen's d | length baseline | "
        "bag-of-words baseline | held-out pos/neg |",
        "|---|---|---:|---:|---:|---:|---|---|---:|",
    ]
    for c in comparisons:
        for f in c.variants.values():
            lines.append(
                f"| {c.trait} | {f.variant} | {f.layer} | {f.accuracy:.2f} | {f.auroc:.2f} | "
                f"{f.cohens_d:.2f} | {f.length} | {f.bag_of_words} | "
                f"{f.n_test['pos']}/{f.n_test['neg']} |"
            )
    if any(c.transfers for c in comparisons):
        lines += [
            "",
            "Cross-distribution: vectors fitted on one variant's train split, scored at that "
            "variant's best layer on the other variant's held-out responses (threshold from the "
            "source's train projections).",
            "",
            "| trait | vectors from | scored on | layer | accuracy | AUROC | Cohen's d | "
            "accuracy on own held-out |",
            "|---|---|---|---:|---:|---:|---:|---:|",
        ]
        for c in comparisons:
            for t in c.transfers:
                own = c.variants[t.source].accuracy
                lines.append(
                    f"| {c.trait} | {t.source} | {t.target} | {t.layer} | {t.accuracy:.2f} | "
                    f"{t.auroc:.2f} | {t.cohens_d:.2f} | {own:.2f} |"
                )
    return lines


def comparison_json(comparisons: Sequence[TraitComparison]) -> list[dict]:
    return [asdict(c) for c in comparisons]
