"""A steering sweep rendered: its table, its JSON and its picture (score against alpha)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from tlextract.report.figures import save_figure
from tlextract.steering.sweep import Sweep
from tlextract.store import write_json, write_text


def _num(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def sweep_table(sweep: Sweep) -> str:
    """One markdown row per condition."""
    lines = [
        "| condition | judge trait (missing) | projection ± sem | log-prob/token | "
        "distinct tokens | judge coherence (missing) | empty |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for c in sweep.conditions:
        label = f"alpha {c.alpha:+g}" if c.intervention == "steer" else "ablated"
        lines.append(
            f"| {label} | {_num(c.trait, '.1f')} ({_num(c.trait_missing, '.0%')}) | "
            f"{_num(c.projection, '.2f')} ± {_num(c.projection_sem, '.2f')} | "
            f"{_num(c.logprob, '.2f')} | {_num(c.distinct, '.2f')} | "
            f"{_num(c.coherence, '.1f')} ({_num(c.coherence_missing, '.0%')}) | "
            f"{c.n_empty}/{c.n} |"
        )
    return "\n".join(lines) + "\n"


def write_sweep(sweep: Sweep, out: Path) -> list[Path]:
    """``sweep.json``, ``sweep.md`` (the table) and ``score_vs_alpha.png`` in ``out``."""
    write_json(out / "sweep.json", asdict(sweep))
    write_text(out / "sweep.md", sweep_table(sweep))
    return [out / "sweep.json", out / "sweep.md", plot_sweep(sweep, out / "score_vs_alpha.png")]


def _series(
    ax: Any, sweep: Sweep, field: str, label: str, color: str, sem: str | None = None
) -> None:
    """One measure against alpha (error bars: standard error), and its ablated value as a
    dotted line."""
    points = [
        (c.alpha, getattr(c, field), getattr(c, sem) if sem else None)
        for c in sweep.conditions
        if c.intervention == "steer" and getattr(c, field) is not None
    ]
    if points:
        ax.errorbar(
            [p[0] for p in points],
            [p[1] for p in points],
            yerr=[p[2] or 0.0 for p in points],
            marker="o",
            capsize=3,
            color=color,
            label=label,
        )
    for c in sweep.conditions:
        if c.intervention == "ablate" and getattr(c, field) is not None:
            ax.axhline(getattr(c, field), color=color, linestyle=":", label=f"{label}, ablated")


def plot_sweep(sweep: Sweep, path: Path) -> Path:  # long: three panels, drawn in turn
    """Three panels against alpha: the judge's scores and missing fractions, the re-read
    projection with the extraction's poles, and the two judge-free fluency measures."""
    fig = Figure(figsize=(15, 4.8), layout="constrained")
    judge_ax, proj_ax, fluency_ax = fig.subplots(1, 3, sharex=True)
    judge = sweep.judge.split("#")[0]  # the name without its settings hash
    if sweep.judge == "none":
        judge_ax.text(
            0.5, 0.5, "no judge (judge 'none')", ha="center", transform=judge_ax.transAxes
        )
    else:
        _series(judge_ax, sweep, "trait", "trait score", "tab:blue", "trait_sem")
        _series(judge_ax, sweep, "coherence", "coherence", "tab:orange")
        for field, color in (("trait_missing", "tab:blue"), ("coherence_missing", "tab:orange")):
            steered = [c for c in sweep.conditions if c.intervention == "steer"]
            judge_ax.plot(
                [c.alpha for c in steered],
                [100 * getattr(c, field) for c in steered],
                color=color,
                linestyle="--",
                marker="x",
                label=f"% {field.split('_')[0]} missing",
            )
        judge_ax.set(ylim=(-3, 103), ylabel="judge score (0-100) / % missing")
        judge_ax.legend(fontsize="small")
    judge_ax.set_title(f"judge: {judge}", fontsize="medium")
    _series(proj_ax, sweep, "projection", "answers", "tab:purple", "projection_sem")
    for pol, color in (("pos", "tab:red"), ("neg", "tab:blue")):
        if sweep.poles is not None:
            proj_ax.axhline(
                sweep.poles[pol], color=color, linestyle="--", label=f"extraction {pol} mean"
            )
    proj_ax.set(ylabel="mean projection on the unit vector")
    proj_ax.set_title(f"re-read by the unsteered model at {sweep.hook_name}", fontsize="medium")
    proj_ax.legend(fontsize="small")
    _series(fluency_ax, sweep, "logprob", "log-prob per token", "tab:gray")
    fluency_ax.set_ylabel("mean log-prob per token (unsteered model)")
    distinct_ax = fluency_ax.twinx()
    _series(distinct_ax, sweep, "distinct", "distinct-token fraction", "tab:green")
    distinct_ax.set_ylabel("distinct-token fraction")
    fluency_ax.legend(
        *[
            a + b
            for a, b in zip(
                fluency_ax.get_legend_handles_labels(),
                distinct_ax.get_legend_handles_labels(),
                strict=True,
            )
        ],
        fontsize="small",
    )
    fluency_ax.set_title("fluency, judge-free", fontsize="medium")
    for ax in (judge_ax, proj_ax, fluency_ax):
        ax.set_xlabel("alpha (typical residual norms)")
        ax.grid(alpha=0.3)
    fig.suptitle(
        f"{sweep.trait} ({sweep.variant}) · {sweep.model} · {sweep.method} layer "
        f"{sweep.layer} · positions {sweep.positions} · typical norm {sweep.scale:.1f}"
        f" · {len(sweep.questions)} held-out questions per condition"
    )
    return save_figure(fig, path, dpi=100)
