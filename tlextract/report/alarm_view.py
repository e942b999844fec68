"""The alarm's formulations side by side (``alarm.md``) and per trait the shipped alarm: what
``python -m tlextract alarm`` writes next to the monitor's output."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

from tlextract.monitoring.alarm import Alarm, AlarmFigures
from tlextract.store import write_json, write_text


def formulations_table(figures: Mapping[str, Sequence[AlarmFigures]]) -> list[str]:
    """One row per trait and formulation: TPR on held-out pos tokens, the rate on held-out neg
    tokens and on held-out neutral tokens, and the layers the folds used."""
    lines = [
        "| trait | formulation | TPR, pos tokens | neg tokens above | false alarms, neutral "
        "tokens | layers (per fold) |",
        "|---|---|---|---|---|---|",
    ]
    for trait, rows in figures.items():
        lines += [
            f"| {trait} | {f.formulation.describe()} | {f.tpr:.2f} | {f.neg_rate:.2f} | "
            f"{f.false_alarm:.3f} | {', '.join(map(str, f.layers))} |"
            for f in rows
        ]
    return lines


def alarms_table(alarms: Mapping[str, Alarm]) -> list[str]:
    """The shipped alarm per trait: layer, threshold, held-out false-alarm rate, CV TPR."""
    lines = [
        "| trait | alarm | threshold | false alarms, held-out neutral tokens | TPR, held-out pos "
        "tokens | neg tokens above |",
        "|---|---|---:|---|---|---|",
    ]
    for t, a in alarms.items():
        f = a.figures
        lines.append(
            f"| {t} | L{a.layer}, {f.formulation.method}, window {f.formulation.window} | "
            f"{a.threshold:.4g} | {a.false_alarm:.3f} | {f.tpr:.2f} | {f.neg_rate:.2f} |"
        )
    return lines


def write_alarm_report(
    out: Path,
    rate: float,
    figures: Mapping[str, Sequence[AlarmFigures]],
    alarms: Mapping[str, Alarm],
    about: str,
) -> list[Path]:
    md = [
        f"# Per-token alarm at {rate:.0%} false alarms",
        "",
        about,
        "",
        "## The alarm monitor uses",
        "",
        *alarms_table(alarms),
        "",
        "## Formulations compared (cross-validated by example; 95% intervals)",
        "",
        *formulations_table(figures),
        "",
    ]
    paths = [out / "alarm.md", out / "alarm.json"]
    write_text(paths[0], "\n".join(md))
    write_json(paths[1], {
        "rate": rate,
        "alarms": {t: asdict(a) for t, a in alarms.items()},
        "formulations": {t: [asdict(f) for f in rows] for t, rows in figures.items()},
    })  # fmt: skip
    return paths
