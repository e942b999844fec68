"""Figures of the held-out evaluation, drawn on an Agg canvas directly, never through pyplot, so
importing this module does not change the matplotlib backend of a notebook that imports it.

Per trait run, next to ``metrics.json`` in ``<run.out_dir>/report/``:

- ``metrics_by_layer.png``: held-out accuracy, AUROC and Cohen's d against layer, one line per
  method, the best layer starred;
- ``projections.png``: held-out projections, pos vs neg, at each method's best layer;

and per experiment ``cosine_<variant>_layer<L>.png``, the cosine similarity of the traits' vectors.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from tlextract.evaluation.cosines import CosineMatrix
from tlextract.evaluation.evaluate import TraitEvaluation
from tlextract.store import atomic_path
from tlextract.traits import POLARITIES

PANELS = (  # metric field, axis label, chance level
    ("accuracy", "held-out balanced accuracy", 0.5),
    ("auroc", "held-out AUROC", 0.5),
    ("cohens_d", "held-out Cohen's d", 0.0),
)
COLORS = {"pos": "tab:red", "neg": "tab:blue"}


def save_figure(fig: Figure, path: Path, dpi: int = 110) -> Path:
    """``fig`` as a PNG at ``path``, written atomically."""
    FigureCanvasAgg(fig)  # attach the Agg canvas: PNG without pyplot
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return path


def pos_neg(counts: dict[str, int]) -> str:
    return "/".join(str(counts[p]) for p in POLARITIES)


def _title(ev: TraitEvaluation) -> str:
    fitted = f" · vectors fitted on {ev.train_trait}/{ev.train_variant}" if ev.is_cross else ""
    return (
        f"{ev.trait} · {ev.model} · variant {ev.variant}{fitted} · "
        f"hook blocks.<layer>.hook_{ev.hook}\n"
        f"held-out n = {pos_neg(ev.n_test)} pos/neg (train {pos_neg(ev.n_train)}), "
        f"split by example index, seed {ev.seed}"
    )


def plot_metrics(ev: TraitEvaluation, path: Path) -> Path:
    """Held-out accuracy, AUROC and Cohen's d against layer; one line per method."""
    fig = Figure(figsize=(15, 4.8), layout="constrained")
    for ax, (field, label, chance) in zip(fig.subplots(1, 3), PANELS, strict=True):
        for method in ev.methods:
            rows = [r for r in ev.rows if r.method == method]
            (line,) = ax.plot(
                [r.layer for r in rows],
                [getattr(r, field) for r in rows],
                marker="o",
                markersize=3,
                label=method,
            )
            best = ev.best[method]
            ax.plot(
                best.layer,
                getattr(best, field),
                marker="*",
                markersize=15,
                color=line.get_color(),
                markeredgecolor="black",
                linestyle="none",
            )
        ax.axhline(chance, color="grey", linestyle="--", linewidth=0.8)
        if field != "cohens_d":
            ax.set_ylim(-0.03, 1.03)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set(xlabel="layer (TransformerLens block index)", ylabel=label, title=label)
        ax.grid(alpha=0.3)
        ax.legend(title="method (star: best layer)", fontsize="small")
    fig.suptitle(_title(ev))
    return save_figure(fig, path)


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
            ax.hist(
                scores, bins=bins, alpha=0.6, color=COLORS[pol], label=f"{pol} (n={len(scores)})"
            )
        ax.axvline(
            held.threshold,
            color="black",
            linestyle="--",
            linewidth=1,
            label="threshold (train midpoint)",
        )
        ax.set(
            title=f"{method} · best layer {held.layer}\naccuracy {best.accuracy:.2f} · "
            f"AUROC {best.auroc:.2f} · d {best.cohens_d:.2f}",
            xlabel=f"projection on unit vector at {ev.hook_name(held.layer)}",
            ylabel="held-out examples",
        )
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize="small")
    for ax in axes[len(ev.methods) :]:
        ax.set_visible(False)
    fig.suptitle(_title(ev))
    return save_figure(fig, path)


def plot_cosine(cm: CosineMatrix) -> Path:
    """Annotated heatmap of ``cm.matrix``, written to ``cm.png``."""
    k = len(cm.traits)
    size = (max(6.5, 2.8 + 1.2 * k), max(5.0, 2.2 + 1.0 * k))
    fig = Figure(figsize=size, layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(cm.matrix, cmap="RdBu_r", vmin=-1, vmax=1)
    for i, row in enumerate(cm.matrix):
        for j, value in enumerate(row):
            ax.text(
                j,
                i,
                f"{value:.2f}",
                ha="center",
                va="center",
                color="white" if abs(value) > 0.6 else "black",
            )
    ax.set_xticks(range(k), cm.traits, rotation=30, ha="right")
    ax.set_yticks(range(k), [f"{t}\n(n={pos_neg(cm.counts[t])})" for t in cm.traits])
    ax.set(xlabel="trait", ylabel="trait (n = pos/neg examples behind the vector)")
    fig.colorbar(image, ax=ax, label="cosine similarity")
    fig.suptitle(
        f"{cm.experiment}: cosine similarity of {cm.method} vectors\n"
        f"model {cm.model} · variant {cm.variant}\n"
        f"layer {cm.layer} ({cm.hook_name})"
    )
    return save_figure(fig, cm.png)
