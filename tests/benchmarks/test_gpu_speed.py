"""``make bench-gpu``: the original study's workload shape (100 + 100 examples) on both embedded
models in bfloat16 on a CUDA GPU, batch 1 to 64, tlextract against transformers at each batch
size and the pipeline table, then the engine=vllm tables
(:func:`tlextract.benchmarks.pipeline.gpu_benchmark`; `make bench-gpu` builds the CUDA vLLM first).
Writes ``docs/benchmarks/gpu-pipeline.md`` table by table as each is measured, so a later
failure keeps the tables before it, and a vLLM that cannot run leaves its reason where its rows
would be.
Skipped without a GPU; tests/test_bench.py runs the same code on the CPU with the tiny model and
tests/test_bench_tables.py the table-by-table writing. No timing is asserted."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tlextract.benchmarks.pipeline import gpu_benchmark

pytestmark = [pytest.mark.bench, pytest.mark.slow]

OUT = Path(__file__).resolve().parents[2] / "docs" / "benchmarks" / "gpu-pipeline.md"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_speed(benchmark, tmp_path: Path, capsys) -> None:
    result: dict = {}
    benchmark.pedantic(lambda: result.update(gpu_benchmark(OUT, tmp_path)), rounds=1, iterations=1)
    benchmark.extra_info.update(result)
    with capsys.disabled():
        print("\n" + OUT.read_text())
