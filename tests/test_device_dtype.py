"""The default dtype follows the device (bfloat16 on CUDA, float32 elsewhere; an explicit one
wins), is recorded resolved, and the responses key tells CUDA samples from CPU ones while every
CPU float32 key stays as it was (tests/test_cache_keys.py pins those)."""

from __future__ import annotations

import pytest
import torch

from tlextract.config import load_experiment
from tlextract.model.cache import TINY_MODEL
from tlextract.model.load import load_model, model_info
from tlextract.settings import RunSettings, settings_for
from tlextract.stages.responses import responses_key
from tlextract.stages.stage import stage_meta


def _run(**overrides: object) -> RunSettings:
    return settings_for(load_experiment("smollm2_cognitive"), "local_global", **overrides)  # type: ignore[arg-type]


@pytest.fixture
def cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine with one CUDA GPU, as far as the settings can tell."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_default_dtype_is_float32_without_a_gpu(no_cuda: None) -> None:
    assert _run().dtype == "float32"
    assert _run(dtype="auto").dtype == "float32"
    assert _run(dtype="bfloat16").dtype == "bfloat16"


def test_default_dtype_is_bfloat16_on_cuda_and_an_explicit_one_wins(cuda: None) -> None:
    assert _run().dtype == "bfloat16"
    assert _run(device="cuda:0").dtype == "bfloat16"
    assert _run(device="cpu").dtype == "float32"
    assert _run(dtype="float32").dtype == "float32"


def test_stage_meta_records_the_resolved_dtype_and_the_device(cuda: None) -> None:
    meta = stage_meta("responses", "k", _run())
    assert (meta["dtype"], meta["device"]) == ("bfloat16", "cuda")
    meta = stage_meta("responses", "k", _run(device="cpu"))
    assert (meta["dtype"], meta["device"]) == ("float32", "cpu")


def test_responses_key_tells_cuda_and_bfloat16_samples_from_cpu_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cpu = responses_key(_run())
    cpu_bf16 = responses_key(_run(dtype="bfloat16"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    # A machine with a GPU asked for the CPU draws the CPU's samples: the same key.
    assert responses_key(_run(device="cpu")) == cpu
    cuda_fp32 = responses_key(_run(dtype="float32"))
    cuda_auto = responses_key(_run())  # bfloat16
    assert responses_key(_run(device="cuda:0", dtype="float32")) == cuda_fp32
    assert len({cpu, cpu_bf16, cuda_fp32, cuda_auto}) == 4


def test_load_model_resolves_auto_on_the_cpu() -> None:
    model = load_model(TINY_MODEL, device="cpu", dtype="auto", fast=False)
    assert model_info(model)["dtype"] == "float32" and model.W_E.dtype == torch.float32


@pytest.mark.parametrize("command", ["run", "steer"])
def test_the_command_line_takes_dtype_auto(command: str) -> None:
    from tlextract.cli.main import build_parser

    args = build_parser().parse_args([command, "--dtype", "auto"])
    assert args.dtype == "auto"
