"""experiments/quickstart.ipynb runs top to bottom (on a small copy of the default experiment)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "experiments" / "quickstart.ipynb"


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path: Path, monkeypatch) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    # The experiment's definitions without its results, with fewer examples, layers and tokens,
    # so the notebook extracts from scratch in about a minute and never touches experiments/.
    exp = tmp_path / "smollm2_cognitive"
    shutil.copytree(
        ROOT / "experiments" / "smollm2_cognitive",
        exp,
        ignore=shutil.ignore_patterns("extraction*", "report*", "monitor*"),
    )
    config = json.loads((exp / "experiment.json").read_text())
    config.update(
        n_examples=6, layers=[10, 16, 22], generation={**config["generation"], "max_new_tokens": 12}
    )
    (exp / "experiment.json").write_text(json.dumps(config))
    monkeypatch.setenv("TLEXTRACT_EXPERIMENTS", str(tmp_path))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the kernel inherits it: tiny matmuls, busy CPUs

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    ).execute()

    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 3  # metrics by layer, score vs alpha, heatmap
    assert any("text/html" in o.get("data", {}) for o in outputs)
    out = exp / "retrieval_construction" / "extraction-natural"
    assert (out / "vectors" / "mean_diff.pt").exists()
    assert (out / "quickstart" / "heatmap_0.png").exists()
