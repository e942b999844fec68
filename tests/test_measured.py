"""The report's steering and monitoring section reads what steer --auto and alarm wrote."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import write_experiment

from tlextract.config import load_experiment
from tlextract.report.measured import measured_section
from tlextract.settings import monitor_dir, settings_for, steer_dir


def _iv(v: float, lo: float, hi: float) -> dict[str, float]:
    return {"value": v, "low": lo, "high": hi}


def test_section_quotes_the_saved_figures_and_names_what_is_missing(tmp_path: Path) -> None:
    write_experiment(tmp_path)
    exp = load_experiment("tiny", tmp_path)
    alpha, beta = (settings_for(exp, t) for t in ("alpha", "beta"))
    steer_dir(alpha).mkdir(parents=True)
    effects = {"wrong_way": _iv(0.25, 0.1, 0.45)}
    (steer_dir(alpha) / "auto.json").write_text(json.dumps({
        "chosen": {"layer": 1, "alpha": 0.2},
        "report": [
            {"name": "unsteered", "shift": None, "effects": None},
            {"name": "steered", "shift": _iv(0.18, 0.07, 0.29), "effects": effects},
            {"name": "random direction", "shift": _iv(-0.06, -0.2, 0.1),
             "effects": {"wrong_way": _iv(0.56, 0.3, 0.8)}},
        ],
    }))  # fmt: skip
    monitor_dir(alpha).mkdir(parents=True)
    alarm = {"figures": {"rate": 0.05, "tpr": _iv(0.54, 0.44, 0.64)},
             "false_alarm": _iv(0.039, 0.016, 0.08)}  # fmt: skip
    (monitor_dir(alpha) / "alarm.json").write_text(json.dumps({"alarms": {"alpha": alarm}}))
    lines = measured_section([alpha, beta])
    rows = {line.split(" |")[0]: line for line in lines if line.startswith("| alpha") or
            line.startswith("| beta")}  # fmt: skip
    assert rows["| alpha (instruction)"] == (
        "| alpha (instruction) | L1 alpha +0.2: +0.18 [+0.07, +0.29] (random -0.06) | "
        "0.25 [0.10, 0.45] (random 0.56) | 0.54 [0.44, 0.64] at 5% (0.039 [0.016, 0.080]) |"
    )
    assert "not measured (make steer)" in rows["| beta (instruction)"]
    assert "not measured (python -m tlextract alarm)" in rows["| beta (instruction)"]
