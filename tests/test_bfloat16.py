"""The GPU path in bfloat16, on the CPU, so the first GPU run does not die on a dtype: the
accelerated model (fused weights, KV buffers), generation with capture, the teacher-forced
pooling and a whole pipeline run, each checked against the stock TransformerLens model or
against float32 (the GPU figures themselves wait for a GPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import MIXED_LENGTH_TEXTS, chat_ids
from tlextract.config import GenerationSettings, load_experiment
from tlextract.model.load import load_model
from tlextract.ops.generate import generate_batch
from tlextract.ops.pool import hook_name, pooled_activations
from tlextract.settings import settings_for
from tlextract.stages.run import run_trait

pytestmark = pytest.mark.usefixtures("one_thread")
GREEDY = GenerationSettings(max_new_tokens=6, do_sample=False)


@pytest.fixture(scope="module")
def models():
    """The accelerated and the stock tiny model, both in bfloat16."""
    return (load_model("tiny-random", device="cpu", dtype="bfloat16"),
            load_model("tiny-random", device="cpu", dtype="bfloat16", fast=False))  # fmt: skip


def test_fast_bf16_forward_keeps_the_dtype_and_matches_stock(models) -> None:
    fast, stock = models
    ids = torch.tensor(chat_ids(fast, MIXED_LENGTH_TEXTS[1:2]))
    with torch.inference_mode():
        a, b = fast(ids), stock(ids)
    assert fast.W_E.dtype == torch.bfloat16 and a.dtype == b.dtype
    # bf16 keeps 8 bits of mantissa: the two computations round differently, not far.
    assert (a.float() - b.float()).abs().max() < 0.05 * b.float().abs().max()


def test_bf16_capture_equals_teacher_forced_pooling(models) -> None:
    fast, _ = models
    prompts = chat_ids(fast, MIXED_LENGTH_TEXTS)
    layers = list(range(fast.cfg.n_layers))
    names = [hook_name("resid_post", layer) for layer in layers]
    gens = generate_batch(fast, prompts, GREEDY, [0] * len(prompts), capture=names)
    rows = [i for i, g in enumerate(gens) if g.response_ids]
    forced = pooled_activations(fast, [prompts[i] for i in rows],
                                [gens[i].response_ids for i in rows], layers)  # fmt: skip
    captured = torch.stack([gens[i].pooled for i in rows])
    assert captured.dtype == forced.dtype == torch.float32  # pooled in float32 from bf16
    torch.testing.assert_close(captured, forced, rtol=0.05, atol=0.05)


def test_bf16_batched_generation_equals_serial(models) -> None:
    fast, _ = models
    prompts = chat_ids(fast, MIXED_LENGTH_TEXTS)
    batched = generate_batch(fast, prompts, GREEDY, [0] * len(prompts))
    serial = [generate_batch(fast, [p], GREEDY, [0])[0] for p in prompts]
    same = sum(a.response_ids == b.response_ids for a, b in zip(batched, serial, strict=True))
    assert same >= len(prompts) - 1  # bf16 rounding may flip one near-tie, rarely


@pytest.mark.parametrize("mode", ["two-stage", "combined"])
def test_bf16_pipeline_runs_and_is_close_to_float32(experiments: Path, mode: str) -> None:
    exp = load_experiment("tiny", experiments)
    vectors = {
        dtype: run_trait(settings_for(exp, "alpha", dtype=dtype, mode=mode))
        for dtype in ("float32", "bfloat16")
    }
    bf16, fp32 = vectors["bfloat16"], vectors["float32"]
    assert bf16 is not None and fp32 is not None and bf16.vectors.dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(bf16.vectors, fp32.vectors, dim=-1)
    assert cos.min() > 0.9  # sampled tokens can differ in bf16; the direction holds
