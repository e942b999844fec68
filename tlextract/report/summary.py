"""Plots and an experiment-level summary of the held-out evaluations.

Per trait run, next to ``metrics.json`` in ``<run.out_dir>/report/``:

- ``metrics_by_layer.png``: held-out accuracy, AUROC and Cohen's d against layer, one line per
  method, the best layer starred;
- ``projections.png``: held-out projections, pos vs neg, at each method's best layer.

Per experiment, in ``experiments/<exp>/report/`` (``report-<model>`` for another model):

- ``summary.md``: one row per trait and variant with each method's best layer and its metrics;
- ``cosine_<variant>_layer<L>.{png,json}``: cosine similarity of the traits' mean_diff vectors.

Figures are drawn on an Agg canvas directly, never through pyplot, so importing this module does
not change the matplotlib backend of a notebook that imports it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torch import Tensor

from tlextract.analysis.evaluate import (
    RULE_TEXT,
    TraitEvaluation,
    evaluate_trait,
)
from tlextract.analysis.variants import (
    TraitComparison,
    compare_variants,
    comparison_json,
    comparison_markdown,
)
from tlextract.config import Experiment
from tlextract.errors import TLExtractError
from tlextract.ops.methods import METHODS
from tlextract.ops.pool import hook_name
from tlextract.ops.vectors import TraitVectors
from tlextract.settings import RunSettings, experiment_report_dir, report_dir, settings_for
from tlextract.stages.activations import activations_key
from tlextract.stages.generate import responses_key
from tlextract.stages.judge import judge_key, load_selection
from tlextract.store import atomic_path, stage_done, write_json, write_text
from tlextract.traits import POLARITIES, Variant

PANELS = (  # metric field, axis label, chance level
    ("accuracy", "held-out balanced accuracy", 0.5),
    ("auroc", "held-out AUROC", 0.5),
    ("cohens_d", "held-out Cohen's d", 0.0),
)
COLORS = {"pos": "tab:red", "neg": "tab:blue"}


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)  # attach the Agg canvas: PNG without pyplot
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return path


def _n(counts: dict[str, int]) -> str:
    return "/".join(str(counts[p]) for p in POLARITIES)


def _title(ev: TraitEvaluation) -> str:
    fitted = f" · vectors fitted on {ev.train_trait}/{ev.train_variant}" if ev.is_cross else ""
    return (f"{ev.trait} · {ev.model} · variant {ev.variant}{fitted} · "
            f"hook blocks.<layer>.hook_{ev.hook}\n"
            f"held-out n = {_n(ev.n_test)} pos/neg (train {_n(ev.n_train)}), "
            f"split by example index, seed {ev.seed}")


def plot_metrics(ev: TraitEvaluation, path: Path) -> Path:
    """Held-out accuracy, AUROC and Cohen's d against layer; one line per method."""
    fig = Figure(figsize=(15, 4.8), layout="constrained")
    for ax, (field, label, chance) in zip(fig.subplots(1, 3), PANELS, strict=True):
        for method in ev.methods:
            rows = [r for r in ev.rows if r.method == method]
            (line,) = ax.plot([r.layer for r in rows], [getattr(r, field) for r in rows],
                              marker="o", markersize=3, label=method)
            best = ev.best[method]
            ax.plot(best.layer, getattr(best, field), marker="*", markersize=15,
                    color=line.get_color(), markeredgecolor="black", linestyle="none")
        ax.axhline(chance, color="grey", linestyle="--", linewidth=0.8)
        if field != "cohens_d":
            ax.set_ylim(-0.03, 1.03)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set(xlabel="layer (TransformerLens block index)", ylabel=label, title=label)
        ax.grid(alpha=0.3)
        ax.legend(title="method (star: best layer)", fontsize="small")
    fig.suptitle(_title(ev))
    return _save(fig, path)


def plot_projections(ev: TraitEvaluation, path: Path) -> Path:
    """Histograms of held-out projections, pos vs neg, at each method's best layer."""
    ncols = min(len(ev.methods), 3)
    nrows = math.ceil(len(ev.methods) / ncols)
    fig = Figure(figsize=(5.2 * ncols, 3.9 * nrows + 0.9), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, method in zip(axes, ev.methods, strict=False):
        held, best = ev.held_out[method], ev.best[method]
        values = [*held.pos, *held.neg, held.threshold]
        bins = torch.linspace(min(values), max(values) + 1e-9, 21).tolist()
        for pol, scores in (("pos", held.pos), ("neg", held.neg)):
            ax.hist(scores, bins=bins, alpha=0.6, color=COLORS[pol],
                    label=f"{pol} (n={len(scores)})")
        ax.axvline(held.threshold, color="black", linestyle="--", linewidth=1,
                   label="threshold (train midpoint)")
        ax.set(title=f"{method} · best layer {held.layer}\naccuracy {best.accuracy:.2f} · "
               f"AUROC {best.auroc:.2f} · d {best.cohens_d:.2f}",
               xlabel=f"projection on unit vector at {ev.hook_name(held.layer)}",
               ylabel="held-out examples")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize="small")
    for ax in axes[len(ev.methods):]:
        ax.set_visible(False)
    fig.suptitle(_title(ev))
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# cosine similarity between traits


@dataclass(frozen=True)
class CosineMatrix:
    """``matrix[i][j]``: cosine similarity of the mean_diff vectors of ``traits[i]`` and
    ``traits[j]`` at ``layer``. ``missing`` says why a trait of the experiment is left out."""

    experiment: str
    model: str
    variant: str
    method: str
    layer: int
    hook_name: str
    traits: list[str]
    counts: dict[str, dict[str, int]]  # trait -> examples per polarity behind its vector
    matrix: list[list[float]]
    missing: dict[str, str]
    png: Path
    json: Path


def _ready(run: RunSettings) -> bool:
    """Whether the run's current activations and judgments exist: all an evaluation needs."""
    responses = responses_key(run)
    return (stage_done(run.stage_dir("activations"), activations_key(run, responses))
            and stage_done(run.stage_dir("judge"), judge_key(run, responses)))


def _saved_vectors(run: RunSettings, method: str = "mean_diff") -> TraitVectors | None:
    """The run's saved vectors if they come from its current activations and as many kept
    examples as its current judgments keep (vectors files record no more than that)."""
    path = run.stage_dir("vectors") / f"{method}.pt"
    if not (path.exists() and _ready(run)):
        return None
    vectors = TraitVectors.load(path)
    kept = load_selection(run).kept
    current = {"activations_fingerprint": activations_key(run, responses_key(run)),
               **{f"n_{p}": len(kept[p]) for p in POLARITIES}}
    return vectors if all(vectors.metadata.get(k) == v for k, v in current.items()) else None


def cosines(vectors: Float[Tensor, "trait d_model"]) -> Float[Tensor, "trait trait"]:
    """Pairwise cosine similarity in float64 (a zero vector gets 0 everywhere)."""
    v = vectors.double()
    unit = v / v.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(v.dtype).tiny)
    return (unit @ unit.T).clamp(-1.0, 1.0)


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
        tv = _saved_vectors(settings_for(experiment, name, variant=variant, **overrides))
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


def plot_cosine(cm: CosineMatrix) -> Path:
    """Annotated heatmap of ``cm.matrix``, written to ``cm.png``."""
    k = len(cm.traits)
    size = (max(6.5, 2.8 + 1.2 * k), max(5.0, 2.2 + 1.0 * k))
    fig = Figure(figsize=size, layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(cm.matrix, cmap="RdBu_r", vmin=-1, vmax=1)
    for i, row in enumerate(cm.matrix):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center",
                    color="white" if abs(value) > 0.6 else "black")
    ax.set_xticks(range(k), cm.traits, rotation=30, ha="right")
    ax.set_yticks(range(k), [f"{t}\n(n={_n(cm.counts[t])})" for t in cm.traits])
    ax.set(xlabel="trait", ylabel="trait (n = pos/neg examples behind the vector)")
    fig.colorbar(image, ax=ax, label="cosine similarity")
    fig.suptitle(f"{cm.experiment}: cosine similarity of {cm.method} vectors\n"
                 f"model {cm.model} · variant {cm.variant}\n"
                 f"layer {cm.layer} ({cm.hook_name})")
    return _save(fig, cm.png)


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
    lines = ["| trait | variant | judge | kept pos/neg | held-out pos/neg | "
             + " | ".join(methods) + " | details |",
             "|---|---|---|---:|---:|" + "---|" * len(methods) + "---|"]
    for run, ev in runs:
        n: dict[str, int] = {p: ev.n_train[p] + ev.n_test[p] for p in POLARITIES}
        folder = report_dir(run)
        details = " · ".join(_link(label, folder / f, out) for label, f in (
            ("table", "metrics.md"), ("by layer", "metrics_by_layer.png"),
            ("projections", "projections.png")))
        lines.append(f"| {ev.trait} | {ev.variant} | {ev.judge} | {_n(n)} | {_n(ev.n_test)} | "
                     + " | ".join(_best_cell(ev, m) for m in methods) + f" | {details} |")
    return lines


def _cosine_section(cm: CosineMatrix, out: Path) -> list[str]:
    lines = [f"## Cosine similarity of mean_diff vectors: {cm.variant}, layer {cm.layer} "
             f"(`{cm.hook_name}`)", "", f"![cosine matrix]({cm.png.name})", "",
             "| | " + " | ".join(cm.traits) + " |", "|---|" + "---:|" * len(cm.traits)]
    lines += [f"| {t} | " + " | ".join(f"{v:.2f}" for v in row) + " |"
              for t, row in zip(cm.traits, cm.matrix, strict=True)]
    lines += [f"- left out {t}: {why}" for t, why in cm.missing.items()]
    return [*lines, "", f"Values: {_link(cm.json.name, cm.json, out)}", ""]


def summary_markdown(
    experiment: Experiment,
    runs: Sequence[tuple[RunSettings, TraitEvaluation]],
    not_run: Sequence[RunSettings],
    matrices: Sequence[CosineMatrix],
    out: Path,
) -> str:
    first = runs[0][1]
    lines = [
        f"# Report: experiment `{experiment.name}`, model `{first.model}`", "",
        f"- hook `blocks.<layer>.hook_{first.hook}` (layer = TransformerLens block index)",
        f"- held-out evaluation: split by example index (seed {first.seed}, test fraction "
        f"{first.test_fraction}); each method fitted on the train split, scored on the held-out "
        "split",
        "- each method's cell: best layer: held-out accuracy / AUROC / Cohen's d "
        "(accuracy: balanced, threshold at the midpoint of the train class means)",
        f"- best layer: {RULE_TEXT[first.rule]}", "",
        "## Best layer per method", "", *_trait_table(runs, out), "",
    ]
    lines += [f"- not evaluated, no activations or judgments for these settings: {r.trait.name} "
              f"({r.variant}); run `python -m tlextract run --experiment {experiment.name} "
              f"--traits {r.trait.name} --variant {r.variant}` with the same settings"
              for r in not_run]
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
        compare_variants({v: r for v, (r, _) in done.items()},
                         {v: e for v, (_, e) in done.items()}, test_fraction, seed)
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
    test_fraction: float = 0.25,
    seed: int = 0,
    rule: str = "auroc",
    **overrides: Any,
) -> Path:
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
    not_run: list[RunSettings] = []
    for variant in variants:
        for name in traits or experiment.traits:
            run = settings_for(experiment, name, variant=variant, **overrides)
            if not _ready(run):
                not_run.append(run)
                continue
            ev = evaluate_trait(run, methods, test_fraction, seed, rule)
            plot_metrics(ev, report_dir(run) / "metrics_by_layer.png")
            plot_projections(ev, report_dir(run) / "projections.png")
            runs.append((run, ev))
    if not runs:
        raise TLExtractError(
            f"{experiment.name}: no trait has activations and judgments for these settings; run "
            f"python -m tlextract run --experiment {experiment.name} first."
        )
    matrices = []
    for variant in variants:
        done = [(run, ev) for run, ev in runs if run.variant == variant]
        if any(_saved_vectors(run) for run, _ in done):
            at = layer if layer is not None else _default_layer([ev for _, ev in done])
            matrices.append(cosine_matrix(experiment, at, variant, traits=traits, out_dir=out,
                                          **overrides))
    comparisons = _compare(runs, test_fraction, seed) if len(variants) > 1 else []
    if comparisons:
        write_json(out / "variants.json", comparison_json(comparisons))
    path = out / "summary.md"
    summary = summary_markdown(experiment, runs, not_run, matrices, out)
    if comparisons:
        summary += "\n" + "\n".join(comparison_markdown(comparisons)) + "\n"
    write_text(path, summary)
    print(f"[{experiment.name}] report: {len(runs)} trait runs -> {path}")
    return path
