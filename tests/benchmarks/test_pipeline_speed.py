"""``make bench``: tlextract against transformers' ``generate`` at batch 1, 8 and 16, and the
original project's pipeline table, on the default model on this CPU, all in one run
(:func:`tlextract.benchmarks.pipeline.cpu_benchmark`). Writes ``docs/benchmarks/pipeline.md``,
which the
README quotes. ``TLEXTRACT_BENCH_N`` (examples per polarity, default 32) and
``TLEXTRACT_BENCH_NEW`` (new tokens, default 32) size it. No timing is asserted."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tlextract.benchmarks.pipeline import cpu_benchmark

pytestmark = [pytest.mark.bench, pytest.mark.slow]

OUT = Path(__file__).resolve().parents[2] / "docs" / "benchmarks" / "pipeline.md"


def test_cpu_speed(benchmark, tmp_path: Path, capsys) -> None:
    result: dict = {}

    def measure() -> None:
        result.update(cpu_benchmark(
            OUT, tmp_path,
            n_examples=int(os.environ.get("TLEXTRACT_BENCH_N", "32")),
            n_new=int(os.environ.get("TLEXTRACT_BENCH_NEW", "32")),
        ))  # fmt: skip

    benchmark.pedantic(measure, rounds=1, iterations=1)
    benchmark.extra_info.update(result)
    with capsys.disabled():
        print("\n" + OUT.read_text())
