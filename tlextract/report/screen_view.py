"""A screening rendered: ``screen.json`` (every sample ranked, per trait), ``screen.md`` (the
mean with its interval, the top and bottom samples) and ``screen.png`` (the sorted differences)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from tlextract.report.figures import save_figure
from tlextract.stages.screening import Screening, TraitScreening
from tlextract.store import write_json, write_text

SHOWN = 5  # samples at each end of the markdown table
LABEL_COLORS = {True: "tab:red", False: "tab:blue", None: "tab:gray"}


def summary(ts: TraitScreening) -> str:
    """One line: the mean projection difference with its interval (and the labels' AUROC)."""
    line = (f"[{ts.trait}] layer {ts.layer}: mean projection difference {ts.mean:+.3f} over "
            f"{len(ts.rows)} samples")  # fmt: skip
    if ts.auroc is not None:
        means = ", ".join(f"label={str(y).lower()} {m:+.3f}" for y, m in ts.by_label().items())
        line += f"; AUROC of the ranking for label=true {ts.auroc:.3f}; means {means}"
    return line


def screening_json(screening: Screening, data: str) -> dict[str, Any]:
    return {
        "data": data,
        "n_samples": screening.n_samples,
        "not_scored_no_own_response": screening.no_own_response,
        "generation": screening.generation,
        "traits": {
            t: {"layer": ts.layer, "hook_name": ts.hook_name, "mean_diff": asdict(ts.mean),
                "auroc": asdict(ts.auroc) if ts.auroc else None,
                "mean_diff_by_label": {str(y).lower(): asdict(m)
                                       for y, m in ts.by_label().items()},
                "ranked": [asdict(r) for r in ts.ranked()]}
            for t, ts in screening.traits.items()
        },
    }  # fmt: skip


def _cell(text: str, width: int = 80) -> str:
    flat = " ".join(text.split()).replace("|", "\\|")
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def screening_markdown(screening: Screening, data: str) -> str:
    lines = [f"# Screening {data}", ""]
    for ts in screening.traits.values():
        lines += [f"## {ts.trait} ({ts.hook_name})", "", summary(ts) + " (95% bootstrap "
                  "intervals; positive: fine-tuning on the data should push the trait up)", "",
                  "| rank | sample | diff | data | own | label | prompt | response |",
                  "|---:|---:|---:|---:|---:|---|---|---|"]  # fmt: skip
        ranked = ts.ranked()
        shown = ranked if len(ranked) <= 2 * SHOWN else [*ranked[:SHOWN], *ranked[-SHOWN:]]
        for r in shown:
            label = "" if r.label is None else str(r.label).lower()
            lines.append(f"| {ranked.index(r) + 1} | {r.index} | {r.diff:+.3f} | "
                         f"{r.projection:.3f} | {r.own_projection:.3f} | {label} | "
                         f"{_cell(r.prompt)} | {_cell(r.response)} |")  # fmt: skip
        lines.append("")
    return "\n".join(lines)


def plot_screening(screening: Screening, path: Path) -> Path:
    """Per trait, the samples' differences sorted (coloured by label when the data carry one),
    the mean and its interval as a band."""
    from matplotlib.patches import Patch

    traits = list(screening.traits.values())
    fig = Figure(figsize=(7, 3.4 * len(traits)), layout="constrained")
    for ax, ts in zip(fig.subplots(len(traits), 1, squeeze=False)[:, 0], traits, strict=True):
        ranked = ts.ranked()[::-1]
        ax.bar(range(len(ranked)), [r.diff for r in ranked],
               color=[LABEL_COLORS[r.label] for r in ranked])  # fmt: skip
        band = ax.axhspan(ts.mean.low, ts.mean.high, color="black", alpha=0.15)
        ax.axhline(ts.mean.value, color="black", linewidth=1)
        ax.axhline(0, color="gray", linewidth=0.5)
        auroc = "" if ts.auroc is None else f" · AUROC (label=true) {ts.auroc:.2f}"
        ax.set(title=f"{ts.trait} · {ts.hook_name}\nmean {ts.mean:+.3f}{auroc}",
               xlabel="samples, sorted", ylabel="projection difference")  # fmt: skip
        handles = [band] + ([Patch(color=LABEL_COLORS[y]) for y in (True, False)]
                            if ts.auroc is not None else [])  # fmt: skip
        names = ["mean, 95% interval"] + (["label true", "label false"] if ts.auroc else [])
        ax.legend(handles, names, loc="upper left", fontsize=8)
    return save_figure(fig, path)


def write_screening(screening: Screening, out: Path, data: str) -> list[Path]:
    write_json(out / "screen.json", screening_json(screening, data))
    write_text(out / "screen.md", screening_markdown(screening, data))
    return [out / "screen.json", out / "screen.md", plot_screening(screening, out / "screen.png")]
