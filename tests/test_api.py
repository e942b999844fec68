"""The public API in two levels: about 20 top-level names that tell the notebook's story, plots
in ``tlextract.plots`` (matplotlib loaded on first use), low-level helpers in ``tlextract.ops``;
the README's Python section and the quickstart notebook use only the top level."""

from __future__ import annotations

import inspect
import json
import re
import subprocess
import sys
from pathlib import Path

import tlextract as tx

ROOT = Path(__file__).resolve().parents[1]
USE = re.compile(r"\btx\.(\w+)(?:\.(\w+))?")


def test_the_top_level_is_about_twenty_names_that_all_exist() -> None:
    assert 15 <= len(tx.__all__) <= 24
    assert all(callable(getattr(tx, name)) for name in tx.__all__)
    assert {"plot_sweep", "generate_batch", "generate_responses"}.isdisjoint(tx.__all__)


def test_plots_and_ops_hold_the_second_level() -> None:
    assert all(callable(getattr(tx.plots, name)) for name in tx.plots.__all__)
    assert all(callable(getattr(tx.ops, name)) for name in tx.ops.__all__)
    code = "import sys, tlextract; print('matplotlib' in sys.modules)"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert loaded.stdout.strip() == "False", loaded.stderr


def test_the_model_comes_first_wherever_one_runs() -> None:
    running = []
    for name in tx.__all__:
        fn = getattr(tx, name)
        params = list(inspect.signature(fn).parameters.values()) if inspect.isfunction(fn) else []
        # Model: either backend (tlextract.model.decoding.Model); accelerate/restore: hooked only.
        if any(str(p.annotation) in ("Model", "HookedTransformer") for p in params):
            running.append(name)
            assert params[0].name == "model", name
    assert {"extract", "steer", "monitor", "auto_steer", "calibrate"} <= set(running)


def _uses(text: str) -> set[str]:
    return {f"{a}.{b}" if a in ("plots", "ops") and b else a for a, b in USE.findall(text)}


def test_readme_and_notebook_use_only_the_top_level() -> None:
    readme = (ROOT / "README.md").read_text()
    python = readme.split("## Python API", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    assert _uses(python) and _uses(python) <= set(tx.__all__)
    cells = json.loads((ROOT / "experiments" / "quickstart.ipynb").read_text())["cells"]
    code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    plots = {f"plots.{name}" for name in tx.plots.__all__}
    assert _uses(code) and _uses(code) <= set(tx.__all__) | plots
