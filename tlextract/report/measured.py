"""The report's section on what ``steer --auto`` and ``alarm`` measured, read from the files they
wrote (``steer/auto.json`` per trait run, ``monitor[-variant]/alarm.json`` per experiment): per
trait, the steering shift against the random direction with the share of questions moved the
wrong way, and the alarm's TPR at its false-alarm rate. Traits not measured yet say so."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tlextract.settings import RunSettings, monitor_dir, steer_dir


def _iv(d: dict[str, float], spec: str = ".2f") -> str:
    return f"{d['value']:{spec}} [{d['low']:{spec}}, {d['high']:{spec}}]"


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # not measured yet, or a damaged file: shown as not measured
        return None


def _steer_cell(auto: Any) -> tuple[str, str]:
    if auto is None:
        return "not measured (make steer)", "-"
    if auto.get("chosen") is None:
        return "no setting within the fluency bounds", "-"
    rep = {r["name"]: r for r in auto["report"]}
    steered, rand = rep["steered"], rep["random direction"]
    c = auto["chosen"]
    shift = (f"L{c['layer']} alpha {c['alpha']:+g}: {_iv(steered['shift'], '+.2f')} "
             f"(random {rand['shift']['value']:+.2f})")  # fmt: skip
    effects, r_effects = steered.get("effects"), rand.get("effects")
    if not effects:
        return shift, "-"
    rand_share = f" (random {r_effects['wrong_way']['value']:.2f})" if r_effects else ""
    return shift, _iv(effects["wrong_way"]) + rand_share


def measured_section(runs: Sequence[RunSettings]) -> list[str]:
    """Markdown lines: one row per trait run."""
    lines = [
        "## Steering and monitoring, as last measured",
        "",
        "| trait (variant) | steer --auto: chosen, shift toward pos (random direction) | "
        "questions moved away from pos | alarm: TPR on pos tokens at its false-alarm rate "
        "(held-out rate) |",
        "|---|---|---|---|",
    ]
    for run in runs:
        shift, wrong = _steer_cell(_read(steer_dir(run) / "auto.json"))
        saved = _read(monitor_dir(run) / "alarm.json")
        alarm = (saved or {}).get("alarms", {}).get(run.trait.name)
        monitor = "not measured (python -m tlextract alarm)"
        if alarm is not None:
            rate = alarm["figures"]["rate"]
            monitor = (f"{_iv(alarm['figures']['tpr'])} at {rate:.0%} "
                       f"({_iv(alarm['false_alarm'], '.3f')})")  # fmt: skip
        lines.append(f"| {run.trait.name} ({run.variant}) | {shift} | {wrong} | {monitor} |")
    return [*lines, ""]
