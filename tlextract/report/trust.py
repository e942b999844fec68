"""The cross-validated figures in the experiment summary: a table with intervals, baselines,
nulls and a verdict per trait, and a forest plot of the AUROC intervals per trait run
(``report/crossval.png``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure

from tlextract.evaluation.crossval import HEADLINE, CrossValidation
from tlextract.report.figures import save_figure

KIND_COLORS = {"method": "tab:green", "baseline": "tab:orange", "null": "tab:gray"}


def plot_intervals(cv: CrossValidation, path: Path) -> Path:
    """AUROC with its 95% interval for every method, baseline and null; chance at 0.5."""
    rows = cv.scored[::-1]
    fig = Figure(figsize=(7, 0.45 * len(rows) + 1.4), layout="constrained")
    ax = fig.add_subplot()
    for i, s in enumerate(rows):
        a = s.auroc
        ax.errorbar(a.value, i, xerr=[[a.value - a.low], [a.high - a.value]], fmt="o",
                    color=KIND_COLORS[s.kind], capsize=3)  # fmt: skip
    ax.set_yticks(range(len(rows)), [f"{s.name} ({s.kind})" for s in rows])
    ax.axvline(0.5, color="black", lw=0.8, ls=":")
    best = cv.get(cv.best_baseline).auroc
    ax.axvspan(best.low, best.high, color=KIND_COLORS["baseline"], alpha=0.12)
    ax.set_xlim(0, 1.02)
    ax.set_xlabel("cross-validated AUROC, 95% bootstrap interval over examples")
    ax.set_title(
        f"{cv.trait} ({cv.variant}) · {cv.model} · {cv.n['pos']}/{cv.n['neg']} pos/neg, "
        f"{cv.folds} folds\nshaded: best surface baseline ({cv.best_baseline})",
        fontsize=9,
    )
    return save_figure(fig, path)


def crossval_section(cvs: Sequence[tuple[CrossValidation, str]]) -> list[str]:
    """Summary lines: one row per (cross-validation, link to its folder's crossval.md)."""
    lines = [
        f"## Cross-validated figures ({HEADLINE}): every example scored once",
        "",
        "Nested cross-validation by example index: each fold's layer chosen on the other folds "
        "alone, so no choice saw the scores it is judged by. 95% intervals: bootstrap over "
        "examples. Baselines and nulls are scored on the same folds: *beats baselines* means "
        "the AUROC interval lies wholly above the best surface baseline's.",
        "",
        "| trait | variant | pos/neg | accuracy | AUROC | Cohen's d | use layer | "
        "best baseline (AUROC) | random direction | shuffled labels | beats baselines | details |",
        "|---|---|---:|---|---|---|---:|---|---|---|:---:|---|",
    ]
    for cv, link in cvs:
        m = cv.get(HEADLINE)
        base = cv.get(cv.best_baseline)
        lines.append(
            f"| {cv.trait} | {cv.variant} | {cv.n['pos']}/{cv.n['neg']} | {m.accuracy} | "
            f"{m.auroc} | {m.cohens_d} | {cv.layer[HEADLINE]} | {base.name} {base.auroc} | "
            f"{cv.get('random direction').auroc} | {cv.get('shuffled labels').auroc} | "
            f"{'yes' if cv.beats_baseline[HEADLINE] else '**no**'} | {link} |"
        )
    losers = [f"{cv.trait} ({cv.variant})" for cv, _ in cvs if not cv.beats_baseline[HEADLINE]]
    if losers:
        lines += ["", "Not shown to beat a surface baseline: " + ", ".join(losers) + "."]
    return lines
