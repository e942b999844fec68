"""Plots and an experiment-level summary of the held-out evaluations.

Per trait run, next to ``metrics.json`` in ``<run.out_dir>/report/``:

- ``metrics_by_layer.png``: held-out accuracy, AUROC and Cohen's d against layer, one line per
  method, the best layer starred;
- ``projections.png``: held-out projections, pos vs neg, at each method's best layer;
- ``vector_tokens.json``: the tokens the mean_diff vector promotes and suppresses at its
  cross-validated layer (the logit lens, :func:`tlextract.vector_tokens`; report/lens_view.py).

Per experiment, in ``experiments/<exp>/report/`` (``report-<model>`` for another model):

- ``summary.md``: one row per trait and variant with each method's best layer and its metrics;
- ``cosine_<variant>_layer<L>.{png,json}``: cosine similarity of the traits' mean_diff vectors.

The report loads the model once, for the logit lens, when some trait run has vectors.

Figures are drawn on an Agg canvas directly, never through pyplot, so importing this module does
not change the matplotlib backend of a notebook that imports it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from tlextract.config import EVALUATION, Experiment
from tlextract.errors import TLExtractError
from tlextract.evaluation.cosines import CosineMatrix, cosines, saved_vectors
from tlextract.evaluation.crossval import HEADLINE, CrossValidation, cross_validate
from tlextract.evaluation.evaluate import (
    BEST_TEXT,
    TraitEvaluation,
    evaluate_trait,
)
from tlextract.evaluation.variants import (
    TraitComparison,
    compare_variants,
    comparison_json,
    comparison_markdown,
)
from tlextract.ops.methods import METHODS
from tlextract.ops.pool import hook_name
from tlextract.ops.trait_vectors import TraitVectors
from tlextract.report.figures import plot_cosine, plot_metrics, plot_projections, pos_neg
from tlextract.report.lens_view import lens_section, save_vector_tokens
from tlextract.report.measured import measured_section
from tlextract.report.trust import crossval_section, plot_intervals
from tlextract.settings import RunSettings, experiment_report_dir, report_dir, settings_for
from tlextract.stages.run import is_done
from tlextract.store import write_json, write_text
from tlextract.traits import POLARITIES, Variant

# ---------------------------------------------------------------------------------------------
# cosine similarity between traits

log = logging.getLogger(__name__)


def cosine_matrix(
    experiment: Experiment,
    layer: int,
    variant: Variant = "instruction",
    *,
    traits: Sequence[str] | None = None,
    out_dir: Path | None = None,
    **overrides: Any,
) -> CosineMatrix:
    """Cosine similarities between the saved mean_diff vectors of every trait that has them
    (for ``variant`` and the run ``overrides`` of :func:`settings_for`) at ``layer``.

    Writes ``cosine_<variant>_layer<layer>.png`` (annotated heatmap) and ``.json`` into
    ``out_dir`` (default :func:`experiment_report_dir`).
    """
    found: dict[str, TraitVectors] = {}
    missing: dict[str, str] = {}
    for name in traits or experiment.traits:
        tv = saved_vectors(settings_for(experiment, name, variant=variant, **overrides))
        if tv is None:
            missing[name] = "no mean_diff vectors for these settings (run the vectors stage)"
        elif layer not in tv.layers:
            missing[name] = f"no layer {layer} (has {list(tv.layers)})"
        else:
            found[name] = tv
    if not found:
        raise TLExtractError(
            f"{experiment.name}: no trait has mean_diff vectors at layer {layer} for variant "
            f"{variant}: {missing}. Run: python -m tlextract vectors --experiment "
            f"{experiment.name} --variant {variant}."
        )
    sims = cosines(torch.stack([tv[layer] for tv in found.values()]))
    out = out_dir or experiment_report_dir(experiment, overrides.get("model"))
    stem = out / f"cosine_{variant}_layer{layer}"
    cm = CosineMatrix(
        experiment=experiment.name,
        model=next(iter(found.values())).model,
        variant=variant,
        method="mean_diff",
        layer=layer,
        hook_name=hook_name(experiment.hook, layer),
        traits=list(found),
        counts={t: {p: int(tv.metadata[f"n_{p}"]) for p in POLARITIES} for t, tv in found.items()},
        matrix=sims.tolist(),
        missing=missing,
        png=stem.with_suffix(".png"),
        json=stem.with_suffix(".json"),
    )
    write_json(cm.json, {k: v for k, v in asdict(cm).items() if k not in ("png", "json")})
    plot_cosine(cm)
    return cm


# ---------------------------------------------------------------------------------------------
# experiment summary


def _default_layer(evaluations: Sequence[TraitEvaluation]) -> int:
    """The lower median of the traits' best mean_diff layers (first method's if absent)."""
    method = "mean_diff" if "mean_diff" in evaluations[0].methods else evaluations[0].methods[0]
    layers = sorted(ev.best[method].layer for ev in evaluations)
    return layers[(len(layers) - 1) // 2]


def _best_cell(ev: TraitEvaluation, method: str) -> str:
    b = ev.best[method]
    return f"L{b.layer}: {b.accuracy:.2f} / {b.auroc:.2f} / {b.cohens_d:.2f}"


def _link(label: str, target: Path, base: Path) -> str:
    return f"[{label}]({Path(os.path.relpath(target, base)).as_posix()})"


def _trait_table(runs: Sequence[tuple[RunSettings, TraitEvaluation]], out: Path) -> list[str]:
    methods = runs[0][1].methods
    lines = [
        "| trait | variant | judge | kept pos/neg | held-out pos/neg | "
        + " | ".join(methods)
        + " | details |",
        "|---|---|---|---:|---:|" + "---|" * len(methods) + "---|",
    ]
    for run, ev in runs:
        n: dict[str, int] = {p: ev.n_train[p] + ev.n_test[p] for p in POLARITIES}
        folder = report_dir(run)
        details = " · ".join(
            _link(label, folder / f, out)
            for label, f in (
                ("table", "metrics.md"),
                ("by layer", "metrics_by_layer.png"),
                ("projections", "projections.png"),
            )
        )
        lines.append(
            f"| {ev.trait} | {ev.variant} | {ev.judge} | {pos_neg(n)} | "
            f"{pos_neg(ev.n_test)} | "
            + " | ".join(_best_cell(ev, m) for m in methods)
            + f" | {details} |"
        )
    return lines


def _cosine_section(cm: CosineMatrix, out: Path) -> list[str]:
    lines = [
        f"## Cosine similarity of mean_diff vectors: {cm.variant}, layer {cm.layer} "
        f"(`{cm.hook_name}`)",
        "",
        f"![cosine matrix]({cm.png.name})",
        "",
        "| | " + " | ".join(cm.traits) + " |",
        "|---|" + "---:|" * len(cm.traits),
    ]
    lines += [
        f"| {t} | " + " | ".join(f"{v:.2f}" for v in row) + " |"
        for t, row in zip(cm.traits, cm.matrix, strict=True)
    ]
    lines += [f"- left out {t}: {why}" for t, why in cm.missing.items()]
    return [*lines, "", f"Values: {_link(cm.json.name, cm.json, out)}", ""]


def summary_markdown(
    experiment: Experiment,
    runs: Sequence[tuple[RunSettings, TraitEvaluation]],
    not_run: Sequence[RunSettings],
    matrices: Sequence[CosineMatrix],
    out: Path,
    crossval: Sequence[str] = (),
) -> str:
    first = runs[0][1]
    lines = [
        f"# Report: experiment `{experiment.name}`, model `{first.model}`",
        "",
        f"- hook `blocks.<layer>.hook_{first.hook}` (layer = TransformerLens block index)",
        "",
        *crossval,
        "",
        "## Per layer on one split (descriptive)",
        "",
        "One held-out split, the layer picked on the very split it is scored on: an upward-"
        "biased view for reading trends across layers and methods. Quote the cross-validated "
        "figures above.",
        "",
        f"- split by example index (seed {first.seed}, test fraction {first.test_fraction}); "
        "each method fitted on the train split, scored on the held-out split",
        "- each method's cell: best layer: held-out accuracy / AUROC / Cohen's d "
        "(accuracy: balanced, threshold at the midpoint of the train class means)",
        f"- best layer: {BEST_TEXT}",
        "",
        *_trait_table(runs, out),
        "",
    ]
    lines += [
        f"- not evaluated, no activations or judgments for these settings: {r.trait.name} "
        f"({r.variant}); run `python -m tlextract run --experiment {experiment.name} "
        f"--traits {r.trait.name} --variant {r.variant}` with the same settings"
        for r in not_run
    ]
    for cm in matrices:
        lines += ["", *_cosine_section(cm, out)]
    return "\n".join(lines).rstrip() + "\n"


def _compare(
    runs: Sequence[tuple[RunSettings, TraitEvaluation]], test_fraction: float, seed: int
) -> list[TraitComparison]:
    """Variant comparisons for every trait evaluated under more than one variant."""
    by_trait: dict[str, dict[str, tuple[RunSettings, TraitEvaluation]]] = {}
    for run, ev in runs:
        by_trait.setdefault(run.trait.name, {})[run.variant] = (run, ev)
    return [
        compare_variants(
            {v: r for v, (r, _) in done.items()},
            {v: e for v, (_, e) in done.items()},
            test_fraction,
            seed,
        )
        for done in by_trait.values()
        if len(done) > 1
    ]


def build_report(
    experiment: Experiment,
    traits: Sequence[str] | None = None,
    *,
    variants: Sequence[Variant] | None = None,
    methods: Sequence[str] = tuple(METHODS),
    layer: int | None = None,
    test_fraction: float = EVALUATION.test_fraction,
    seed: int = 0,
    folds: int = EVALUATION.folds,
    **overrides: Any,
) -> Path:
    # long: one pass over the runs (evaluate, cross-validate, plot), then the experiment pages
    """Evaluate every trait and variant that has activations and judgments (kept examples
    only), plot each, draw the cosine matrix per variant, and write the experiment summary;
    returns the summary's path.

    ``overrides`` (model, n_examples, layers, dtype, mode, judge) go to :func:`settings_for`,
    so the report reads the outputs that the stage commands with the same options wrote.
    ``layer`` (default: the median of the traits' best mean_diff layers) is the cosine
    matrix's layer.
    """
    variants = variants or (experiment.variant,)
    out = experiment_report_dir(experiment, overrides.get("model"))
    runs: list[tuple[RunSettings, TraitEvaluation]] = []
    cvs: list[tuple[CrossValidation, str]] = []
    not_run: list[RunSettings] = []
    for variant in variants:
        for name in traits or experiment.traits:
            run = settings_for(experiment, name, variant=variant, **overrides)
            if not (is_done(run, "activations") and is_done(run, "judge")):
                not_run.append(run)
                continue
            cv = cross_validate(run, [HEADLINE, *(m for m in methods if m != HEADLINE)],
                                folds, seed)  # fmt: skip
            ev = evaluate_trait(run, methods, test_fraction, seed, cv.layer)
            plot_metrics(ev, report_dir(run) / "metrics_by_layer.png")
            plot_projections(ev, report_dir(run) / "projections.png")
            plot_intervals(cv, report_dir(run) / "crossval.png")
            runs.append((run, ev))
            cvs.append((cv, _link("table", report_dir(run) / "crossval.md", out) + " · "
                        + _link("plot", report_dir(run) / "crossval.png", out)))  # fmt: skip
    if not runs:
        raise TLExtractError(
            f"{experiment.name}: no trait has activations and judgments for these settings; run "
            f"python -m tlextract run --experiment {experiment.name} first."
        )
    matrices = []
    for variant in variants:
        done = [(run, ev) for run, ev in runs if run.variant == variant]
        if any(saved_vectors(run) for run, _ in done):
            at = layer if layer is not None else _default_layer([ev for _, ev in done])
            matrices.append(
                cosine_matrix(experiment, at, variant, traits=traits, out_dir=out, **overrides)
            )
    comparisons = _compare(runs, test_fraction, seed) if len(variants) > 1 else []
    if comparisons:
        write_json(out / "variants.json", comparison_json(comparisons))
    path = out / "summary.md"
    summary = summary_markdown(experiment, runs, not_run, matrices, out, crossval_section(cvs))
    if comparisons:
        summary += "\n" + "\n".join(comparison_markdown(comparisons)) + "\n"
    lens = save_vector_tokens(
        [(run, cv.layer[HEADLINE]) for (run, _), (cv, _) in zip(runs, cvs, strict=True)]
    )
    summary += "\n".join(lens_section(lens, lambda label, to: _link(label, to, out)))
    summary += "\n" + "\n".join(measured_section([run for run, _ in runs]))
    write_text(path, summary)
    log.info("[%s] report: %d trait runs -> %s", experiment.name, len(runs), path)
    return path
