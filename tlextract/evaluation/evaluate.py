"""Held-out evaluation of every extraction method on one trait run, cached like a stage.

Pos example ``i`` and neg example ``i`` share a question (or, for natural prompts, a matched
topic), so the split is by *example index*: both sides of a held-out index are in the test set
and neither is in the train set, otherwise the test set would contain the question the vector
was fitted on. Only the examples the judge kept are used, as in the vectors stage. Each method
is fitted on the train rows and scored on the test rows with
:func:`tlextract.ops.metrics.evaluate_vectors`; each method's "best" row is the one at its
cross-validated layer (:mod:`tlextract.evaluation.crossval`, the one best-layer rule of
tlextract), so the split's figures are read where the result card says to use the vectors.

:func:`evaluate_held_out` computes all of it from activations in memory (a
:class:`~tlextract.evaluation.heldout.KeptRun`); :func:`evaluate_trait` and :func:`cross_evaluate`
load a run's saved activations and judge's selection and call it.

Results go to ``<run.out_dir>/report/``: ``metrics.json`` (everything), ``metrics.md`` (a table
per method) and ``meta.json`` (fingerprint of activations + methods + split + the layers read
at), so a rerun with the same inputs reads the results back instead of refitting.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

from jaxtyping import Float
from torch import Tensor

from tlextract.config import EVALUATION
from tlextract.errors import TLExtractError
from tlextract.evaluation.crossval import chosen_layers, in_report_dir
from tlextract.evaluation.heldout import (
    KeptRun,
    Pair,
    common_layers,
    load_kept,
    side_of,
    split_examples,
)
from tlextract.ops.methods import METHODS, get_method, run_method
from tlextract.ops.metrics import (
    LayerMetrics,
    evaluate_vectors,
    project,
)
from tlextract.ops.pool import hook_name
from tlextract.settings import RunSettings, report_dir
from tlextract.stages.activations import Activations
from tlextract.stages.common import model_loader
from tlextract.stages.stage import Job, Stage, run_stage
from tlextract.store import fingerprint, read_json, write_json, write_text
from tlextract.traits import POLARITIES

BEST_TEXT = "the method's cross-validated layer (crossval.md), not chosen on this split"


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HeldOut:
    """Held-out projections at one method's cross-validated layer, for plotting."""

    method: str
    layer: int
    pos: list[float]
    neg: list[float]
    threshold: float  # midpoint of the train class means: where ``accuracy`` cuts


@dataclass(frozen=True)
class TraitEvaluation:
    """Per-method, per-layer held-out metrics of one trait run.

    ``trait``/``variant`` name the held-out activations, ``train_trait``/``train_variant`` the
    ones the vectors were fitted on (the same, except from :func:`cross_evaluate`). Counts are
    rows per polarity.
    """

    experiment: str
    trait: str
    variant: str
    judge: str  # the judge that kept the held-out examples ("none": every response kept)
    train_trait: str
    train_variant: str
    model: str
    hook: str
    layers: list[int]
    methods: list[str]
    test_fraction: float
    seed: int
    n_train: dict[str, int]
    n_test: dict[str, int]
    held_out_examples: list[int]
    rows: list[LayerMetrics]
    best: dict[str, LayerMetrics]
    held_out: dict[str, HeldOut]

    def hook_name(self, layer: int) -> str:
        return hook_name(self.hook, layer)

    @property
    def is_cross(self) -> bool:
        return (self.trait, self.variant) != (self.train_trait, self.train_variant)


def _check_request(methods: Sequence[str]) -> None:
    """Fail on a bad method before any activations are loaded."""
    if not methods:
        raise TLExtractError(f"no methods to evaluate; choose from {', '.join(METHODS)}.")
    for name in methods:
        get_method(name)


def _layers_of(
    kept: KeptRun, methods: Sequence[str], seed: int, layers: Mapping[str, int] | None
) -> dict[str, int]:
    """Each method's cross-validated layer (computed, or as the caller already has it)."""
    if layers is None:
        layers = chosen_layers(kept, methods, seed=seed)
    return {m: layers[m] for m in methods}


def _held_out(
    method: str,
    layer: int,
    column: int,
    vectors: Float[Tensor, "layer d_model"],
    train: Pair,
    test: Pair,
) -> HeldOut:
    v = vectors[column : column + 1]
    tr_p, tr_n = (project(x[:, column : column + 1], v)[:, 0] for x in train)
    te_p, te_n = (project(x[:, column : column + 1], v)[:, 0] for x in test)
    threshold = float((tr_p.double().mean() + tr_n.double().mean()) / 2)
    return HeldOut(method, layer, te_p.tolist(), te_n.tolist(), threshold)


def _evaluate(
    source: KeptRun,
    target: KeptRun,
    methods: Sequence[str],
    test_fraction: float,
    seed: int,
    at: dict[str, int],
) -> TraitEvaluation:
    """Fit on the train split of ``source``, score on the test split of ``target``; each
    method's "best" row is the one at layer ``at[method]``."""
    layers = common_layers(source.acts, target.acts)
    missing = {m: layer for m, layer in at.items() if layer not in layers}
    if missing:
        raise TLExtractError(
            f"{target.run.trait.name} ({target.run.variant}) has no activations at the "
            f"cross-validated layers {missing} of {source.run.trait.name} "
            f"({source.run.variant}); extract both runs at the same layers."
        )
    te_split = split_examples(target.acts.pos_index, target.acts.neg_index, test_fraction, seed)
    train = side_of(
        source.acts,
        layers,
        split_examples(source.acts.pos_index, source.acts.neg_index, test_fraction, seed),
        test=False,
    )
    test = side_of(target.acts, layers, te_split, test=True)
    rows: list[LayerMetrics] = []
    best: dict[str, LayerMetrics] = {}
    held_out: dict[str, HeldOut] = {}
    for name in methods:
        vectors = run_method(name, *train, seed=seed)
        method_rows = evaluate_vectors(vectors, *train, *test, method=name, layers=layers)
        rows += method_rows
        best[name] = next(r for r in method_rows if r.layer == at[name])
        held_out[name] = _held_out(
            name, best[name].layer, layers.index(best[name].layer), vectors, train, test
        )
    return TraitEvaluation(
        experiment=target.run.experiment.name,
        trait=target.run.trait.name,
        variant=target.run.variant,
        judge=target.judge,
        train_trait=source.run.trait.name,
        train_variant=source.run.variant,
        model=target.run.model,
        hook=target.acts.hook,
        layers=layers,
        methods=list(methods),
        test_fraction=test_fraction,
        seed=seed,
        n_train={"pos": train[0].shape[0], "neg": train[1].shape[0]},
        n_test={"pos": test[0].shape[0], "neg": test[1].shape[0]},
        held_out_examples=sorted(te_split.held_out),
        rows=rows,
        best=best,
        held_out=held_out,
    )


def evaluation_key(
    acts: Activations, methods: Sequence[str], test_fraction: float, seed: int, at: object
) -> str:
    """``at``: where each method's best row is read (its cross-validated layers); until 0.5
    a best-layer rule's name stood here, so earlier keys are unchanged in form."""
    return fingerprint(
        {
            "activations": acts.key,
            "methods": list(methods),
            "test_fraction": test_fraction,
            "seed": seed,
            "rule": at,
        }
    )


def evaluate_trait(
    run: RunSettings,
    methods: Sequence[str] = tuple(METHODS),
    test_fraction: float = EVALUATION.test_fraction,
    seed: int = 0,
    layers: Mapping[str, int] | None = None,
) -> TraitEvaluation:
    """Held-out metrics of every method at every layer of ``run``'s activations.

    Uses the examples the judge kept, splits them by example index (seeded), fits each method
    on train, scores on test, and writes
    ``<run.out_dir>/report/{metrics.json,metrics.md,meta.json}``; an identical rerun reads
    ``metrics.json`` back instead (the stages' runner decides, as for every stage). ``layers``:
    each method's cross-validated layer when the caller has it (computed here otherwise).
    """
    _check_request(methods)
    loaded = load_kept(run)
    at = _layers_of(loaded, methods, seed, layers)
    req = HeldOutRequest(loaded, methods, test_fraction, seed, at)
    return run_stage(heldout_stage(req), run, model_loader(run))


@dataclass(frozen=True)
class HeldOutRequest:
    """What one held-out report is of: the kept rows (loaded once, by :func:`evaluate_trait`),
    the methods, the split and each method's layer its "best" row is read at."""

    loaded: KeptRun
    methods: Sequence[str]
    test_fraction: float
    seed: int
    at: dict[str, int]


def heldout_stage(req: HeldOutRequest) -> Stage[TraitEvaluation]:
    """The held-out report as a stage, run and reused by the stages' runner."""
    return Stage(
        "evaluation", (), "report/metrics.json, metrics.md, meta.json",
        key=partial(heldout_key, req=req), compute=partial(compute_evaluation, req=req),
        save=partial(save_evaluation, req=req), load=read_evaluation, folder=in_report_dir,
    )  # fmt: skip


def heldout_key(run: RunSettings, req: HeldOutRequest) -> str:
    at = {"crossval": req.at}
    return evaluation_key(req.loaded.acts, req.methods, req.test_fraction, req.seed, at)


def compute_evaluation(job: Job, req: HeldOutRequest) -> TraitEvaluation:
    return _evaluate(req.loaded, req.loaded, req.methods, req.test_fraction, req.seed, req.at)


def save_evaluation(job: Job, ev: TraitEvaluation, req: HeldOutRequest) -> dict[str, Any]:
    """Writes metrics.json and metrics.md; returns what meta.json records beside the key."""
    write_json(job.dir / "metrics.json", asdict(ev))
    write_text(job.dir / "metrics.md", metrics_markdown(ev))
    summary = ", ".join(f"{m} L{b.layer} AUROC {b.auroc:.2f}" for m, b in ev.best.items())
    log.info("[%s] evaluation: %s -> %s", job.run.trait.name, summary, job.dir)
    return dict(kept_activations_fingerprint=req.loaded.acts.key, judge=ev.judge,
                methods=list(req.methods), test_fraction=req.test_fraction, seed=req.seed,
                best_at_crossval_layers=req.at, n_train=ev.n_train, n_test=ev.n_test)  # fmt: skip


def read_evaluation(run: RunSettings, key: str) -> TraitEvaluation:
    return load_evaluation(report_dir(run) / "metrics.json")


def cross_evaluate(
    train_run: RunSettings,
    test_run: RunSettings,
    methods: Sequence[str] = tuple(METHODS),
    test_fraction: float = EVALUATION.test_fraction,
    seed: int = 0,
    layers: Mapping[str, int] | None = None,
) -> TraitEvaluation:
    """Vectors fitted on ``train_run``'s train split, scored on ``test_run``'s held-out split
    (kept examples only, on both sides): :func:`evaluate_held_out` of the two runs' saved
    activations. Not cached: fitting is cheap next to extraction."""
    _check_request(methods)
    source, target = load_kept(train_run), load_kept(test_run)
    return evaluate_held_out(source, target, methods, test_fraction, seed, layers)


def evaluate_held_out(
    train: KeptRun,
    test: KeptRun | None = None,
    methods: Sequence[str] = tuple(METHODS),
    test_fraction: float = EVALUATION.test_fraction,
    seed: int = 0,
    layers: Mapping[str, int] | None = None,
) -> TraitEvaluation:
    """The held-out figures of activations in memory: vectors fitted on ``train``'s train split,
    scored on the held-out split of ``test`` (default ``train`` itself, as
    :func:`evaluate_trait` does; nothing read or written).

    Both are split exactly as :func:`evaluate_trait` splits a run, so the test rows of another
    run are the ones its own evaluation scores and the two tables compare directly. The
    accuracy threshold comes from ``train``'s train projections (no label of ``test`` is used),
    so accuracy measures transfer of the threshold as well as of the direction; AUROC and
    Cohen's d measure the direction alone. Only layers present in both are scored; the "best"
    rows are at ``train``'s cross-validated layers (``layers``, or computed)."""
    _check_request(methods)
    at = _layers_of(train, methods, seed, layers)
    return _evaluate(train, test or train, methods, test_fraction, seed, at)


def load_evaluation(path: Path) -> TraitEvaluation:
    """Read back a ``metrics.json`` written by :func:`evaluate_trait`."""
    d: dict[str, Any] = read_json(path)
    d.pop("rule", None)  # written until 0.5, when the best row followed a rule of its own
    return TraitEvaluation(
        **{
            **d,
            "rows": [LayerMetrics(**r) for r in d["rows"]],
            "best": {m: LayerMetrics(**r) for m, r in d["best"].items()},
            "held_out": {m: HeldOut(**h) for m, h in d["held_out"].items()},
        }
    )


# ---------------------------------------------------------------------------------------------
# markdown


def _fmt(x: float, digits: int = 3) -> str:
    return f"{x:.{digits}f}"


def describe_split(ev: TraitEvaluation) -> str:
    train = "/".join(str(ev.n_train[p]) for p in POLARITIES)
    test = "/".join(str(ev.n_test[p]) for p in POLARITIES)
    return (
        f"split by example index (seed {ev.seed}, test fraction {ev.test_fraction}): "
        f"train {train} pos/neg rows, held-out {test}"
    )


def metrics_markdown(ev: TraitEvaluation) -> str:
    """One table per method: held-out accuracy, AUROC, Cohen's d and gap at every layer."""
    source = f" (vectors fitted on {ev.train_trait}/{ev.train_variant})" if ev.is_cross else ""
    lines = [
        f"# Held-out evaluation: {ev.trait} ({ev.variant}){source}",
        "",
        f"- experiment `{ev.experiment}`, model `{ev.model}`, hook `blocks.<layer>.hook_{ev.hook}` "
        "(layer = TransformerLens block index)",
        f"- examples kept by judge `{ev.judge}`; {describe_split(ev)}; held-out examples "
        f"{ev.held_out_examples}",
        "- accuracy: balanced accuracy of the midpoint between the train class means; "
        "gap: held-out mean projection pos - neg (activation units, unit vector)",
        f"- best layer: {BEST_TEXT}",
    ]
    for method in ev.methods:
        best = ev.best[method]
        lines += [
            "",
            f"## {method} (best layer {best.layer})",
            "",
            "| layer | hook | accuracy | AUROC | Cohen's d | gap | best |",
            "|---:|---|---:|---:|---:|---:|:---:|",
        ]
        lines += [
            f"| {r.layer} | `{ev.hook_name(r.layer)}` | {_fmt(r.accuracy)} | {_fmt(r.auroc)} | "
            f"{_fmt(r.cohens_d, 2)} | {_fmt(r.gap, 4)} | {'**best**' if r == best else ''} |"
            for r in ev.rows
            if r.method == method
        ]
    return "\n".join(lines) + "\n"
