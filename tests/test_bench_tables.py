"""The benchmark report (docs/benchmarks/gpu-pipeline.md for `make bench-gpu`) is written table
by table as each is measured: a failure later in the run keeps every table before it, and a vLLM
that cannot run leaves its reason where its rows would be. The run is given fast stand-ins that
return rows at once (the real measurements: tests/test_bench.py, tests/test_vllm.py)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

import tlextract.benchmarks.pipeline as bench
from tlextract.benchmarks.roofline import Roofline
from tlextract.errors import TLExtractError

pytestmark = pytest.mark.usefixtures("one_thread")
NO_VLLM = "engine vllm: vLLM is not installed here; install it with `make vllm`"


def _versus(*args: object) -> list[dict]:
    return [{"batch": 1, "contender": bench.HF, "tok_s": 10.0, "ratio": 1.0, "step_ms": 2.0,
             "floor_ms": 1.0, "floor_fraction": 0.5}]  # fmt: skip


def _pipeline(*args: object) -> list[dict]:
    return [{"batch": 1, "mode": "two-stage", "wall_s": 3.0, "tokens": 12, "tok_s": 4.0,
             "peak_mib": 5.0}]  # fmt: skip


@pytest.fixture
def fast(experiments: Path, monkeypatch) -> bench.Measures:
    monkeypatch.setenv("TLEXTRACT_EXPERIMENTS", str(experiments))
    return bench.Measures(lambda *a: Roofline(1e9, 1e9), _versus, _pipeline)


def _run(out: Path, work: Path, measures: bench.Measures) -> dict:
    return bench.gpu_benchmark(
        out, work, workloads=[bench.Workload("tiny", "alpha")], device="cpu", dtype="float32",
        n_examples=2, n_new=3, batch_sizes=(1,), rounds=1, vllm=True, measures=measures,
    )  # fmt: skip


@pytest.fixture
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bench")  # outside the experiments it copies


def test_a_table_is_on_disk_before_the_next_is_measured(fast, work: Path) -> None:
    out = work / "gpu.md"

    def pipeline_fails(*args: object) -> list[dict]:
        assert "| 1 | transformers generate, no hooks | 10.0 |" in out.read_text()
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    with pytest.raises(RuntimeError, match="illegal memory access"):
        _run(out, work / "runs", replace(fast, pipeline=pipeline_fails))
    assert "| 1 | transformers generate, no hooks | 10.0 |" in out.read_text()


def test_a_vllm_that_cannot_run_keeps_the_other_tables_and_says_why(fast, work: Path) -> None:
    def no_vllm(*args: object, **kwargs: object) -> dict:
        raise TLExtractError(NO_VLLM)

    out = work / "gpu.md"
    [measured] = _run(out, work / "runs", replace(fast, vllm=no_vllm))["workloads"]
    text = out.read_text()
    assert "| 1 | transformers generate, no hooks | 10.0 |" in text
    assert "| 1 | two-stage | 3.0 | 12 | 4.0 |" in text
    assert f"No engine=vllm rows: vLLM did not run here (TLExtractError: {NO_VLLM})." in text
    assert "vllm" not in measured and " after." in text  # the finished run's header
