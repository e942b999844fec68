"""Mixture-of-experts models (Mixtral, OLMoE) in bfloat16: TransformerLens 3.9 builds the router
and experts in float32 whatever the config's dtype, so a bf16 forward pass failed ("expected m1
and m2 to have the same dtype"). After load_model's repair a tiny random MoE runs a forward pass
and tlextract's generation in bf16, close to the same weights in float32."""

from __future__ import annotations

import pytest
import torch
from tiny_families import (
    BF16_U,
    family_model,
    greedy_disagreements,
    max_rel_diff,
    random_prompts,
)

from tlextract.config import GenerationSettings
from tlextract.model.fixes import moe_in_model_dtype
from tlextract.model.tokens import left_pad
from tlextract.ops.generate import generate_batch

pytestmark = pytest.mark.usefixtures("one_thread")
# bf16 against float32, relative to the largest |logit|: the weights are rounded once (u/2 each)
# and every op's output again, ~12 rounded ops over 2 layers; the routing weights go through
# bf16 too. Measured at up to 13u on this model; 32u leaves room, and a wrong router or expert
# shifts logits by their own size (~1).
BF16_VS_FP32 = 32 * BF16_U


@pytest.fixture(scope="module")
def models():
    return (moe_in_model_dtype(family_model("mixtral-like")),
            moe_in_model_dtype(family_model("mixtral-like", torch.bfloat16)))  # fmt: skip


def test_every_parameter_is_in_the_model_dtype(models) -> None:
    _, bf16 = models
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    assert bf16.blocks[0].mlp.W_gate.weight.dtype == torch.bfloat16  # the router


def test_bf16_forward_matches_float32(models) -> None:
    fp32, bf16 = models
    tokens, mask = left_pad(random_prompts(), 0, "cpu")
    with torch.inference_mode():
        ref, got = fp32(tokens, attention_mask=mask), bf16(tokens, attention_mask=mask)
    assert got.dtype == torch.bfloat16
    real = mask.bool()
    assert max_rel_diff(ref[real], got[real]) <= BF16_VS_FP32


def test_bf16_generation_runs_and_agrees_with_float32_where_margins_allow(models) -> None:
    fp32, bf16 = models
    prompts = random_prompts()
    gens = generate_batch(bf16, prompts, GenerationSettings(max_new_tokens=6, do_sample=False),
                          [0] * len(prompts))  # fmt: skip
    responses = [g.response_ids for g in gens]
    assert all(responses)
    assert greedy_disagreements(fp32, prompts, responses, BF16_VS_FP32) == []
