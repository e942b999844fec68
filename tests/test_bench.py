"""The GPU benchmark's code, run on the CPU with the tiny model so it cannot rot between GPU
runs (no timing is checked: only that every table row is produced and consistent)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tlextract.benchmarks.pipeline import Workload, gpu_benchmark
from tlextract.benchmarks.roofline import Roofline, product_weights

pytestmark = pytest.mark.usefixtures("one_thread")


def test_gpu_benchmark_runs_on_cpu_with_the_tiny_model(
    experiments: Path, tmp_path_factory, monkeypatch
) -> None:
    monkeypatch.setenv("TLEXTRACT_EXPERIMENTS", str(experiments))
    work = tmp_path_factory.mktemp("bench")
    out = work / "gpu.md"
    results = gpu_benchmark(
        out, work / "runs", workloads=[Workload("tiny", "alpha")], device="cpu",
        dtype="float32", n_examples=2, n_new=3, batch_sizes=(1, 2), rounds=1,
        vllm=False,  # tests/test_vllm.py runs the vLLM tables against the real engine
    )  # fmt: skip
    [measured] = results["workloads"]
    assert [(r["batch"], r["mode"]) for r in measured["pipeline"]] == [
        (1, "two-stage"),
        (1, "combined"),
        (2, "two-stage"),
        (2, "combined"),
    ]
    assert all(r["tokens"] > 0 and r["wall_s"] > 0 for r in measured["pipeline"])
    versus = measured["versus"]
    assert {r["batch"] for r in versus} == {1, 2} and len(versus) == 5  # no sharing at 1
    hf = [r for r in versus if r["contender"].startswith("transformers")]
    assert all(r["ratio"] == pytest.approx(1.0) for r in hf)
    assert all(r["floor_ms"] > 0 for r in versus)
    # a step too cheap to time against noise has no figure, never a negative one
    assert all(r["step_ms"] is None or r["step_ms"] > 0 < r["floor_fraction"] for r in versus)
    text = out.read_text()
    assert text.count("\n| 2 | ") == 5  # three generators and two pipeline modes at batch 2
    assert "fraction of floor" in text and "speedup vs serial two-stage" in text


def test_decode_floor_is_the_larger_of_streaming_and_arithmetic(tiny_model) -> None:
    roof = Roofline(bandwidth=1e9, flops=1e9)
    assert roof.decode_step(1000, 4, 1) == pytest.approx(4e-6)  # 4 kB at 1 GB/s
    assert roof.decode_step(1000, 4, 16) == pytest.approx(32e-6)  # 32 kFLOP at 1 GFLOP/s
    cfg = tiny_model.cfg
    kv = cfg.n_key_value_heads or cfg.n_heads
    per_layer = cfg.d_model * cfg.d_head * (2 * cfg.n_heads + 2 * kv) + 3 * cfg.d_model * cfg.d_mlp
    assert product_weights(tiny_model) == cfg.n_layers * per_layer + cfg.d_model * cfg.d_vocab
