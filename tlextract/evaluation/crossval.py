"""The trustworthy figures of a trait run: nested cross-validation by example index
(:mod:`tlextract.ops.folds`), 95% bootstrap intervals over examples
(:mod:`tlextract.ops.bootstrap`), the surface baselines the vectors must beat and two nulls.

For each method the layer is chosen inside each outer fold on the other folds alone, so no
example's score took part in any choice. Scored the same way, on the same folds:

* baselines: response length in tokens, and a bag-of-words logistic regression on the text;
* nulls: a random unit direction at the layer the trait vector chose (per fold), and the whole
  procedure refitted on shuffled labels (pos and neg swapped for a random half of each fold's
  examples) and scored against the true ones; each repeated five times and pooled. Both sit
  near chance; the random direction can sit above it when the trait spreads over many
  dimensions, which is what it is there to show.

A method *beats the baselines* when its AUROC interval lies wholly above the interval of the
better baseline. ``layer`` is the layer to use the full-data vectors at: the one whose
out-of-fold AUROC over all folds is highest, then Cohen's d, then the lower layer
(:func:`tlextract.ops.folds.pick_layer`, the one rule; what ``steer`` and ``monitor`` default
to).

Results go to ``<run.out_dir>/report/crossval.{json,md}`` and are read back when the
activations, selection and settings are unchanged.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from torch import Tensor

from tlextract.config import EVALUATION
from tlextract.errors import TLExtractError
from tlextract.evaluation.heldout import KeptRun, kept_activations
from tlextract.evaluation.surface import BASELINES, surface_scores
from tlextract.ops.bootstrap import Interval, bootstrap_rows
from tlextract.ops.folds import (
    fold_of,
    nested,
    random_direction_scores,
    shuffled_labels,
)
from tlextract.ops.methods import METHODS, get_method, run_method
from tlextract.ops.metrics import auroc
from tlextract.ops.trait_vectors import TraitVectors
from tlextract.settings import RunSettings, report_dir
from tlextract.stages.activations import ACTIVATIONS, current_activations_key
from tlextract.stages.common import model_loader
from tlextract.stages.judge import JUDGE, load_selection
from tlextract.stages.responses import RESPONSES
from tlextract.stages.stage import Job, Stage, key_only, run_stage
from tlextract.stages.vectors import vectors_key
from tlextract.store import META, fingerprint, read_json, write_text

log = logging.getLogger(__name__)
HEADLINE = "mean_diff"  # the method the nulls and the verdict are about
NULL_REPEATS = 5


@dataclass(frozen=True)
class Scored:
    """One score source over every kept example: a method, a baseline or a null."""

    name: str
    kind: str  # "method", "baseline" or "null"
    accuracy: Interval
    auroc: Interval
    cohens_d: Interval
    layers: list[int]  # block index chosen in each outer fold (none for baselines; the
    # shuffled-label null: every layer any repeat chose)
    unavailable: str = ""  # why it could not be scored on these data (figures are then NaN)


@dataclass(frozen=True)
class CrossValidation:
    experiment: str
    trait: str
    variant: str
    judge: str
    model: str
    hook: str
    folds: int
    seed: int
    n_boot: int
    n: dict[str, int]  # rows per polarity, each scored once
    layers: list[int]
    scored: list[Scored]
    layer: dict[str, int]  # method -> layer to use its full-data vectors at
    per_layer_auroc: dict[str, list[float]]  # method -> out-of-fold AUROC at each layer
    best_baseline: str
    beats_baseline: dict[str, bool]  # method -> AUROC interval above the best baseline's

    def get(self, name: str) -> Scored:
        return next(s for s in self.scored if s.name == name)


def _score(name: str, kind: str, z: Tensor, y: Tensor, groups: list[int], seed: int,
           layers: list[int], n_boot: int) -> Scored:  # fmt: skip
    figures = bootstrap_rows(z, y, groups, n_boot, seed)
    return Scored(name, kind, figures["accuracy"], figures["auroc"], figures["cohens_d"], layers)


def _nulls(x: Tensor, y: Tensor, groups: list[int], fold: Tensor, columns: list[int],
           layers: list[int], seed: int, n_boot: int) -> list[Scored]:  # fmt: skip
    """The two nulls of the headline method, each repeated :data:`NULL_REPEATS` times (new
    random directions, new label swaps) and pooled: one draw of a null alone swings widely
    when the trait is strong, since its direction lines up with the trait by chance or not."""
    fit = partial(run_method, HEADLINE)
    random = [random_direction_scores(x, y, fold, columns, seed + r) for r in range(NULL_REPEATS)]
    shuffled = [nested(x, shuffled_labels(y, groups, fold, seed + r), fold, fit)
                for r in range(NULL_REPEATS)]  # fmt: skip
    ys, gs = y.repeat(NULL_REPEATS), groups * NULL_REPEATS
    return [
        _score("random direction", "null", torch.cat(random), ys, gs, seed,
               [layers[c] for c in columns], n_boot),
        _score("shuffled labels", "null", torch.cat([f.scores for f in shuffled]), ys, gs, seed,
               sorted({layers[c] for f in shuffled for c in f.columns}), n_boot),
    ]  # fmt: skip


def _rows(
    kept: KeptRun, responses: Dataset
) -> tuple[Tensor, Tensor, list[int], list[str], list[int]]:
    """Activations, labels, example indices, texts and lengths of every kept row."""
    acts = kept.acts
    by_key = {(r["polarity"], r["index"]): r for r in responses}
    keys = [("pos", i) for i in acts.pos_index] + [("neg", i) for i in acts.neg_index]
    y = torch.tensor([pol == "pos" for pol, _ in keys])
    texts = [by_key[k]["response"] for k in keys]
    lengths = [int(by_key[k]["n_response_tokens"]) for k in keys]
    return torch.cat([acts.pos, acts.neg]), y, [i for _, i in keys], texts, lengths


def _baseline(name: str, score: Callable[..., Scored], texts: list[str], lengths: list[int],
              y: Tensor, fold: Tensor) -> Scored:  # fmt: skip
    """A surface baseline's figures, or the baseline marked unavailable (and why) when these
    responses cannot give it, e.g. no words for the bag of words."""
    try:
        return score(name, "baseline", surface_scores(texts, lengths, y, fold, name), layers=[])
    except TLExtractError as e:
        nan = Interval(math.nan, math.nan, math.nan)
        return Scored(name, "baseline", nan, nan, nan, [], unavailable=str(e))


def _cross_validate(kept: KeptRun, responses: Dataset, methods: Sequence[str], folds: int,
                    seed: int, n_boot: int) -> CrossValidation:  # fmt: skip
    # long: one pass over methods, baselines and nulls, each scored the same way
    x, y, groups, texts, lengths = _rows(kept, responses)
    fold = fold_of(groups, folds, seed)
    layers = list(kept.acts.layers)
    score = partial(_score, y=y, groups=groups, seed=seed, n_boot=n_boot)
    scored, chosen, per_layer, layer = [], {}, {}, {}
    for name in methods:
        result = nested(x, y, fold, partial(run_method, name, seed=seed))
        chosen[name] = [layers[c] for c in result.columns]
        layer[name] = layers[result.layer]
        oof = result.per_layer
        per_layer[name] = auroc(oof[y], oof[~y]).tolist()
        scored.append(score(name, "method", result.scores, layers=chosen[name]))
        if name == HEADLINE:
            scored += _nulls(x, y, groups, fold, result.columns, layers, seed, n_boot)
    baselines = [_baseline(b, score, texts, lengths, y, fold) for b in BASELINES]
    # The length baseline is always available (every response has a length).
    best = max((b for b in baselines if not b.unavailable), key=lambda s: s.auroc.value)
    return CrossValidation(
        experiment=kept.run.experiment.name, trait=kept.run.trait.name,
        variant=kept.run.variant, judge=kept.judge, model=kept.run.model, hook=kept.acts.hook,
        folds=folds, seed=seed, n_boot=n_boot,
        n={"pos": int(y.sum()), "neg": int((~y).sum())}, layers=layers,
        scored=scored + baselines, layer=layer, per_layer_auroc=per_layer,
        best_baseline=best.name,
        beats_baseline={s.name: s.auroc.above(best.auroc) for s in scored if s.kind == "method"},
    )  # fmt: skip


def cross_validate(
    run: RunSettings,
    methods: Sequence[str] = tuple(METHODS),
    folds: int = EVALUATION.folds,
    seed: int = 0,
    n_boot: int = EVALUATION.n_boot,
) -> CrossValidation:
    """Nested cross-validated figures with intervals, baselines and nulls for ``run`` (kept
    examples only), written to ``report/crossval.{json,md}``; an identical rerun reads them."""
    for name in methods:
        get_method(name)
    return run_stage(crossval_stage(methods, folds, seed, n_boot), run, model_loader(run))


def crossval_stage(
    methods: Sequence[str], folds: int, seed: int, n_boot: int
) -> Stage[CrossValidation]:
    """The cross-validation as a stage of its own, run and reused by the stages' runner; its
    record is ``crossval.json`` itself. Methods are not in the key: each is scored alone, so a
    saved file with more methods holds these ones' figures too (the run's result card reads what
    the report wrote, and the other way round the report recomputes and keeps them all)."""
    return Stage(
        "crossval", (RESPONSES, JUDGE, ACTIVATIONS), "report/crossval.json, crossval.md",
        key=partial(crossval_key, folds=folds, seed=seed, n_boot=n_boot),
        compute=partial(compute_crossval, methods=methods, folds=folds, seed=seed,
                        n_boot=n_boot),
        save=save_crossval, load=partial(read_crossval, methods=methods),
        folder=in_report_dir, record="crossval.json", describe=key_only,
    )  # fmt: skip


def in_report_dir(run: RunSettings, stage: str) -> Path:
    return report_dir(run)


def crossval_key(run: RunSettings, folds: int, seed: int, n_boot: int) -> str:
    """The key of the kept rows' cross-validation (those rows keyed as :func:`load_kept` does)."""
    rows = fingerprint([current_activations_key(run), load_selection(run).kept])
    return _key(rows, folds, seed, n_boot)


def _key(activations_key: str, folds: int, seed: int, n_boot: int) -> str:
    return fingerprint({"activations": activations_key, "folds": folds, "seed": seed,
                        "n_boot": n_boot, "version": 4})  # fmt: skip


def compute_crossval(
    job: Job, methods: Sequence[str], folds: int, seed: int, n_boot: int
) -> CrossValidation:
    selection = job.inputs["judge"]
    kept = KeptRun(job.run, kept_activations(job.inputs["activations"], selection),
                   selection.summary["judge"])  # fmt: skip
    return _cross_validate(kept, job.inputs["responses"], methods, folds, seed, n_boot)


def save_crossval(job: Job, cv: CrossValidation) -> dict[str, Any]:
    """Writes crossval.md; crossval.json, the record, holds the figures."""
    write_text(job.dir / "crossval.md", crossval_markdown(cv))
    head = cv.get(HEADLINE) if HEADLINE in cv.layer else cv.scored[0]
    base = cv.get(cv.best_baseline)
    log.info("[%s] cross-validated %s AUROC %s (best baseline %s %s)", job.run.trait.name,
             head.name, format(head.auroc), base.name, format(base.auroc))  # fmt: skip
    return asdict(cv)


def chosen_layers(
    kept: KeptRun, methods: Sequence[str], folds: int = EVALUATION.folds, seed: int = 0
) -> dict[str, int]:
    """Each method's layer to use, by the nested cross-validation :func:`cross_validate` runs
    (the same folds and rule, without its baselines, nulls and intervals)."""
    acts = kept.acts
    x, y = (
        torch.cat([acts.pos, acts.neg]),
        torch.tensor([True] * len(acts.pos) + [False] * len(acts.neg)),
    )
    fold = fold_of(acts.pos_index + acts.neg_index, folds, seed)
    return {m: acts.layers[nested(x, y, fold, partial(run_method, m, seed=seed)).layer]
            for m in methods}  # fmt: skip


def layer_for(run: RunSettings, vectors: TraitVectors) -> tuple[int, str]:
    """The layer to use ``run``'s saved mean_diff ``vectors`` at, and where it comes from: the
    report's (or result card's) cross-validation of the very rows they were fitted on, else
    one computed now for the run's settings (the result card's call)."""
    path = report_dir(run) / "crossval.json"
    try:
        saved = read_json(path) if path.exists() else None
        if saved is not None and _fitted_on(run, vectors, saved):
            return saved["layer"][HEADLINE], f"highest cross-validated {HEADLINE} AUROC in {path}"
    except (TLExtractError, KeyError, TypeError, ValueError):
        log.info("%s: unreadable, cross-validating again", path)
    try:
        layer = cross_validate(run, [HEADLINE]).layer[HEADLINE]
    except TLExtractError as e:  # too few examples for the folds: the caller can name a layer
        raise TLExtractError(f"{e} Or choose the layer (layer=).",
                             parameters=(*e.parameters, "layer")) from e  # fmt: skip
    return layer, f"highest cross-validated {HEADLINE} AUROC (as the result card, {path})"


def _fitted_on(run: RunSettings, vectors: TraitVectors, saved: dict[str, Any]) -> bool:
    """Whether the saved cross-validation scored the rows ``vectors`` were fitted on (their
    activations and the judge's kept examples, as its key and the vectors' key record)."""
    acts = vectors.metadata.get("activations_fingerprint")
    kept = read_json(run.stage_dir("judge") / META)["kept_index"]
    if acts is None or vectors_key(acts, kept, vectors.method) != vectors.metadata["fingerprint"]:
        return False
    rows = fingerprint([acts, kept])  # what load_kept keys the kept rows by
    return saved["fingerprint"] == _key(rows, saved["folds"], saved["seed"], saved["n_boot"])


def read_crossval(run: RunSettings, key: str, methods: Sequence[str]) -> CrossValidation | None:
    """The saved figures of ``methods``, or None when they are not all there."""
    cv = load_crossval(report_dir(run) / "crossval.json")
    if not set(methods) <= set(cv.layer):
        return None
    return replace(
        cv,
        scored=[s for s in cv.scored if _asked(s, methods)],
        layer={m: cv.layer[m] for m in methods},
        per_layer_auroc={m: cv.per_layer_auroc[m] for m in methods},
        beats_baseline={m: cv.beats_baseline[m] for m in methods},
    )


def _asked(s: Scored, methods: Sequence[str]) -> bool:
    """Whether ``s`` is among what scoring ``methods`` alone gives (nulls come with HEADLINE)."""
    if s.kind == "method":
        return s.name in methods
    return s.kind == "baseline" or HEADLINE in methods


def load_crossval(path: Path) -> CrossValidation:
    d: dict[str, Any] = read_json(path)
    d.pop("fingerprint", None)
    scored = [
        Scored(**{**s, **{f: Interval(**s[f]) for f in ("accuracy", "auroc", "cohens_d")}})
        for s in d.pop("scored")
    ]
    return CrossValidation(**d, scored=scored)


def crossval_markdown(cv: CrossValidation) -> str:
    lines = [
        f"# Cross-validated evaluation: {cv.trait} ({cv.variant})",
        "",
        f"- experiment `{cv.experiment}`, model `{cv.model}`, hook `{cv.hook}`, examples kept by "
        f"judge `{cv.judge}`: {cv.n['pos']} pos / {cv.n['neg']} neg responses, each scored once",
        f"- {cv.folds} folds by example index (seed {cv.seed}); each fold's layer chosen by an "
        "inner cross-validation of the other folds; 95% intervals: percentile bootstrap over "
        f"examples ({cv.n_boot} resamples)",
        "- accuracy: balanced, threshold at the midpoint of the training class means",
        "",
        "| scores | kind | accuracy | AUROC | Cohen's d | layer per fold |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {s.name} | {s.kind} | {s.accuracy} | {s.auroc} | {s.cohens_d} | "
        f"{', '.join(map(str, s.layers)) or '-'} |"
        if not s.unavailable
        else f"| {s.name} | {s.kind} | unavailable: {s.unavailable} | | | - |"
        for s in cv.scored
    ]
    lines += ["", verdict(cv, HEADLINE if HEADLINE in cv.beats_baseline else next(iter(cv.layer)))]
    lines += ["", "Layer to use (highest out-of-fold AUROC over all folds): " + ", ".join(
        f"{m} {layer}" for m, layer in cv.layer.items())]  # fmt: skip
    return "\n".join(lines) + "\n"


def verdict(cv: CrossValidation, method: str) -> str:
    m, b = cv.get(method), cv.get(cv.best_baseline)
    missing = "".join(f" The {s.name} baseline is unavailable: {s.unavailable}" for s in cv.scored
                      if s.unavailable)  # fmt: skip
    if cv.beats_baseline[method]:
        return (f"{method} beats the best surface baseline ({b.name}): AUROC {m.auroc} vs "
                f"{b.auroc}, intervals apart.{missing}")  # fmt: skip
    return (f"{method} does NOT beat the best surface baseline ({b.name}) with non-overlapping "
            f"intervals: AUROC {m.auroc} vs {b.auroc}.{missing}")  # fmt: skip
