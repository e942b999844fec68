"""The prepared GPU check (``make gpu-check``, tlextract.benchmarks.gpu_check) run on this CPU at
tiny shapes: the same code that runs on a GPU at real shapes. Its equality checks pass on every
architecture and dtype, fail when the two models differ, and the report keeps every table
written before a failure. No speed is asserted."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch

from tlextract.benchmarks import gpu_check
from tlextract.benchmarks.gpu_check import HF, HF_HOOKS, MODEL_DTYPES, OURS, Plan, main, run_check
from tlextract.benchmarks.gpu_models import Shape

TINY = {
    "device": "cpu",
    "shape": Shape(tiny=True),
    "batches": (1, 3),
    "new_tokens": 3,
    "check_rows": 4,
}


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> tuple[gpu_check.Report, str]:
    out = tmp_path_factory.mktemp("gpu") / "gpu.md"
    report = run_check(Plan(out=out, check_tokens=8, **TINY))
    return report, out.read_text()


def test_every_architecture_and_dtype_agrees_with_transformers(full) -> None:
    report, text = full
    assert report.failures == []
    for name, dtypes in MODEL_DTYPES.items():
        for dtype in dtypes:
            row = re.search(rf"^\| {name} \| {dtype} \| .*\| (\S+) \|$", text, re.M)
            assert row is not None and row.group(1) == "pass", (name, dtype)
    # Greedy tokens were compared, not all skipped as near-ties.
    compared = [int(m) for m in re.findall(r"\| (\d+)/\d+ \| yes \|", text)]
    assert len(compared) == sum(map(len, MODEL_DTYPES.values())) and min(compared) > 0
    assert "Result: all checks passed." in text


def test_every_speed_table_has_each_batch_and_contender(full) -> None:
    _, text = full
    for name in MODEL_DTYPES:
        assert f"### {name}: speed, 3 forced new tokens per row" in text
    for batch in TINY["batches"]:
        for contender in (OURS, HF, HF_HOOKS):
            # Forced tokens: every contender produced batch x new_tokens, no early stop.
            row = rf"^\| {batch} \| {re.escape(contender)} \| {batch * 3} \| "
            assert len(re.findall(row, text, re.M)) == len(MODEL_DTYPES)
    assert "**Not run on a GPU.**" in text  # a CPU run says so


def _tiny_args(out: Path, *extra: str) -> list[str]:
    return ["--tiny", "--device", "cpu", "--out", str(out), "--batches", "1", "--new-tokens",
            "2", "--check-rows", "3", "--check-tokens", "4", *extra]  # fmt: skip


def test_a_changed_weight_fails_the_check(tmp_path: Path, monkeypatch) -> None:
    build = gpu_check.build_pair

    def altered(*args: Any) -> Any:
        pair = build(*args)
        with torch.no_grad():  # transformers' model only: the two no longer hold the same weights
            pair.hf.model.layers[0].mlp.down_proj.weight.mul_(1.5)
        return pair

    monkeypatch.setattr(gpu_check, "build_pair", altered)
    out = tmp_path / "gpu.md"
    assert main(_tiny_args(out, "--models", "qwen2.5-7b")) == 1
    text = out.read_text()
    assert "| **FAIL** |" in text and "Result: qwen2.5-7b bfloat16: equality." in text


def test_a_model_that_fails_is_reported_and_the_others_still_run(tmp_path, monkeypatch) -> None:
    build = gpu_check.build_pair

    def broken(name: str, *args: Any) -> Any:
        if name == "gemma-2-2b":
            raise RuntimeError("CUDA out of memory\nsecond line")
        return build(name, *args)

    monkeypatch.setattr(gpu_check, "build_pair", broken)
    out = tmp_path / "gpu.md"
    assert main(_tiny_args(out, "--models", "gemma-2-2b,qwen2.5-7b")) == 1
    text = out.read_text()
    assert "**gemma-2-2b failed**: `RuntimeError: CUDA out of memory`" in text
    assert "### qwen2.5-7b: speed" in text  # the model after it still ran


def test_a_crash_part_way_keeps_the_tables_already_written(tmp_path, monkeypatch) -> None:
    """An interrupt (as from the 8-minute timeout) in the second batch size's runs leaves the
    equality table and the first batch size's rows on disk."""
    real = gpu_check.contenders
    calls = []

    def interrupted(*args: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(gpu_check, "contenders", interrupted)
    out = tmp_path / "gpu.md"
    with pytest.raises(KeyboardInterrupt):
        main(_tiny_args(out, "--models", "qwen2.5-7b", "--batches", "1,2"))
    text = out.read_text()
    assert re.search(r"^\| qwen2.5-7b \| bfloat16 \| .*\| pass \|$", text, re.M)
    assert len(re.findall(r"^\| 1 \| ", text, re.M)) == 3  # the three contenders at batch 1
    assert not re.search(r"^\| 2 \| ", text, re.M) and "Result:" not in text


def test_an_unknown_model_is_refused(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(_tiny_args(tmp_path / "gpu.md", "--models", "llama-9"))
    assert e.value.code == 2 and "--models: unknown llama-9" in capsys.readouterr().err


def test_layers_keeps_only_the_first_blocks_of_both_models(tmp_path: Path) -> None:
    """--layers N: real widths at a fraction of the cost; Gemma 2's TransformerLens config (by
    name, not from config.json) gets the same cut, or the two models would differ."""
    out = tmp_path / "gpu.md"
    assert main(_tiny_args(out, "--models", "gemma-2-2b,qwen2.5-7b", "--layers", "1")) == 0
    assert "first 1 blocks only" in out.read_text()
