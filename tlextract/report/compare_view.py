"""A comparison of two models rendered (``python -m tlextract compare``): ``compare.json`` (per
layer the mean shift with its interval, the pos-neg gap and the cosine of the two models'
vectors, per response the shift of every token at one layer), ``compare.md`` (the per-layer
table) and ``compare.png`` (the shift per layer with its band, as a share of the gap).

The gap at a layer is the norm of the base's mean_diff vector there: how far apart the
extraction's pos and neg means lie along the unit vector. Residual norms grow with depth, so a
raw shift says little across layers; its share of the gap says how much of the way from the neg
to the pos responses the other model moved."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from tlextract.ops.bootstrap import Interval
from tlextract.ops.compare import Comparison
from tlextract.report.figures import save_figure
from tlextract.store import write_json, write_text


def comparison_json(
    c: Comparison,
    trait: str,
    examples: Sequence[Mapping[str, Any]],
    tokens: Sequence[Sequence[str]],
    layer: int,
    intervals: Sequence[Interval],
    cosines: Mapping[int, float] | None,
    gaps: Mapping[int, float],
) -> dict[str, Any]:
    at = c.layers.index(layer)
    return {
        "trait": trait, "base": c.base, "other": c.other, "hook": c.hook,
        "shift": "projection of (other - base) on the trait's unit vector, per response the "
                 "mean over its response tokens; interval: 95% bootstrap over responses",
        "layers": [
            {"layer": layer, "hook_name": name, **asdict(iv), "gap": gaps[layer],
             "cosine": None if cosines is None else cosines.get(layer)}
            for layer, name, iv in zip(c.layers, c.hook_names, intervals, strict=True)
        ],
        "token_layer": layer,
        "responses": [
            {**dict(ex), "tokens": list(toks), "shift": [round(float(x), 6) for x in s[:, at]]}
            for ex, toks, s in zip(examples, tokens, c.token_shift[trait], strict=True)
        ],
    }  # fmt: skip


def comparison_table(
    c: Comparison,
    trait: str,
    intervals: Sequence[Interval],
    cosines: Mapping[int, float] | None,
    gaps: Mapping[int, float],
) -> str:
    lines = [
        f"# {trait}: {c.other} against {c.base}",
        "",
        f"Shift of the projection on the {trait} unit vector at `{c.hook}`, other minus base, "
        f"mean over {len(c.rows)} responses (each the mean over its response tokens), 95% "
        "bootstrap interval over responses. Gap: the distance between the extraction's pos and "
        "neg means along the vector (the norm of the base's mean_diff vector).",
        "",
        "| layer | shift [95% interval] | gap | shift / gap | cosine of the two models' vectors |",
        "|---:|---:|---:|---:|---:|",
    ]
    for layer, iv in zip(c.layers, intervals, strict=True):
        cos = "n/a" if cosines is None or layer not in cosines else f"{cosines[layer]:.3f}"
        gap = gaps[layer]
        lines.append(f"| {layer} | {iv:.3f} | {gap:.3f} | {iv.value / gap:+.1%} | {cos} |")
    return "\n".join(lines) + "\n"


def plot_comparison(
    c: Comparison, trait: str, intervals: Sequence[Interval], gaps: Mapping[int, float], path: Path
) -> Path:
    """The mean shift per layer with its 95% band, as a share of the pos-neg gap."""
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    x = list(c.layers)
    share = [(iv.value / gaps[layer], iv.low / gaps[layer], iv.high / gaps[layer])
             for layer, iv in zip(x, intervals, strict=True)]  # fmt: skip
    ax.plot(x, [s[0] for s in share], marker="o", color="tab:purple", label="mean shift")
    ax.fill_between(x, [s[1] for s in share], [s[2] for s in share],
                    color="tab:purple", alpha=0.25, label="95% interval")  # fmt: skip
    ax.axhline(0, color="gray", linewidth=0.8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="layer (block)", ylabel=f"shift at {c.hook} / pos-neg gap")
    other = Path(c.other).name or c.other  # a directory by its own name: the title stays short
    ax.set_title(f"{trait}: {other} minus {c.base} ({len(c.rows)} responses)", fontsize="medium")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return save_figure(fig, path, dpi=100)


def write_comparison(
    c: Comparison,
    trait: str,
    examples: Sequence[Mapping[str, Any]],
    tokens: Sequence[Sequence[str]],
    layer: int,
    cosines: Mapping[int, float] | None,
    gaps: Mapping[int, float],
    out: Path,
) -> list[Path]:
    """``compare.json``, ``compare.md`` and ``compare.png`` in ``out``; ``gaps``: per layer the
    norm of the base's mean_diff vector."""
    intervals = c.intervals(trait)
    saved = comparison_json(c, trait, examples, tokens, layer, intervals, cosines, gaps)
    write_json(out / "compare.json", saved)
    write_text(out / "compare.md", comparison_table(c, trait, intervals, cosines, gaps))
    return [out / "compare.json", out / "compare.md",
            plot_comparison(c, trait, intervals, gaps, out / "compare.png")]  # fmt: skip
