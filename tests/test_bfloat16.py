"""The GPU path in bfloat16, on the CPU, so the first GPU run does not die on a dtype: the
accelerated model (fused weights, KV buffers), generation with capture, the teacher-forced
pooling and a whole pipeline run, each checked against the stock TransformerLens model or
against float32 (the GPU figures themselves wait for a GPU).

The equality suites in bf16, on tiny random models of each family the accelerator handles
(llama-like, gemma2-like with soft-capping and local windows, qwen2-like with Q/K/V biases,
neox-like parallel blocks): accelerated vs stock TransformerLens, and TransformerLens vs
transformers, on logits and residuals at real positions and on greedy tokens where the
reference's top-2 margin allows. Tolerances are in units of bf16's unit roundoff u = 2^-8
(8 significant bits), relative to the reference tensor's largest magnitude."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from tiny_families import (
    BF16_U,
    family_model,
    greedy_disagreements,
    max_rel_diff,
    random_prompts,
)
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens.pretrained.weight_conversions.gemma import convert_gemma_weights
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from tests.conftest import MIXED_LENGTH_TEXTS, chat_ids
from tlextract.config import GenerationSettings, load_experiment
from tlextract.model.accel import accelerate, is_accelerated
from tlextract.model.load import load_hf_model, load_model, load_tokenizer
from tlextract.model.tokens import left_pad
from tlextract.ops.generate import generate_batch
from tlextract.ops.pool import hook_name, pooled_activations
from tlextract.settings import settings_for
from tlextract.stages.run import run_trait

pytestmark = pytest.mark.usefixtures("one_thread")
GREEDY = GenerationSettings(max_new_tokens=6, do_sample=False)
BF16 = torch.bfloat16
# Accelerated vs stock, both bf16: the same operations rounded in other places (fused Q/K/V and
# gate/up products, SDPA, a norm computed once), ~12 rounded operations over 2 layers, each off
# by at most u; measured at most 5u on these families. A wrong fast path is off by O(1).
ACCEL_VS_STOCK = 16 * BF16_U
# TransformerLens vs transformers, both bf16: besides the summation order, each casts to float32
# in other places (norm weights such as Gemma's 1 + w, soft-capping, rotary); measured at most
# 9.5u (Gemma 2, logits).
TL_VS_HF = 32 * BF16_U
ACCEL_FAMILIES = ["llama-like", "gemma2-like", "qwen2-like", "neox-like"]
RESID = "hook_resid_post"


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


# --- the equality suites in bf16 ---


def _real_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    tokens, mask = left_pad(random_prompts(), 0, "cpu")
    return tokens, mask, mask.bool()


@pytest.fixture(scope="module", params=ACCEL_FAMILIES)
def bf16_pair(request) -> tuple[HookedTransformer, HookedTransformer]:
    """(stock, accelerated) bf16 models of one family, the same weights."""
    stock = family_model(request.param, BF16)
    fast = accelerate(copy.deepcopy(stock))
    assert is_accelerated(fast)
    return stock, fast


def test_bf16_accelerated_logits_and_residuals_match_stock(bf16_pair) -> None:
    stock, fast = bf16_pair
    tokens, mask, real = _real_batch()
    with torch.inference_mode():
        expected, ref = stock.run_with_cache(tokens, attention_mask=mask, names_filter=_resid)
        got, cache = fast.run_with_cache(tokens, attention_mask=mask, names_filter=_resid)
    assert got.dtype == BF16
    assert max_rel_diff(expected[real], got[real]) <= ACCEL_VS_STOCK
    assert len(ref) == stock.cfg.n_layers
    for name in ref.keys():
        assert max_rel_diff(ref[name][real], cache[name][real]) <= ACCEL_VS_STOCK, name


def _greedy(model) -> tuple[list[list[int]], list[list[int]]]:  # type: ignore[no-untyped-def]
    """Random prompts and the model's greedy responses to them (none empty)."""
    prompts = random_prompts()
    responses = [g.response_ids for g in generate_batch(model, prompts, GREEDY, [0] * len(prompts))]
    assert all(responses)
    return prompts, responses


def test_bf16_accelerated_greedy_tokens_match_stock(bf16_pair) -> None:
    stock, fast = bf16_pair
    prompts, responses = _greedy(fast)
    assert greedy_disagreements(stock, prompts, responses, ACCEL_VS_STOCK) == []


def _resid(name: str) -> bool:
    return name.endswith(RESID)


def _randomized(hf: torch.nn.Module, unit_norms: bool) -> torch.nn.Module:
    """Weights of a real model's size (norm weights near 1, or near 0 where the norm adds 1)."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            norm = "norm" in name
            base = 1.0 if norm and unit_norms and name.endswith("weight") else 0.0
            p.copy_(torch.randn(p.shape, generator=gen) * (0.1 if norm else 0.3) + base)
    return hf.eval()


HF_SHAPE = dict(vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=64)  # fmt: skip


def _from_directory(family: str, root: Path, fast: bool):
    """(TransformerLens via load_model, transformers) in bf16 from one saved HF model."""
    cls, config = {
        "qwen2-like": (Qwen2ForCausalLM, Qwen2Config(**HF_SHAPE, num_key_value_heads=1)),
        "neox-like": (GPTNeoXForCausalLM, GPTNeoXConfig(**HF_SHAPE, rotary_pct=0.25,
                                                        use_parallel_residual=True)),
    }[family]  # fmt: skip
    torch.manual_seed(0)
    directory = root / family
    _randomized(cls(config), unit_norms=True).save_pretrained(directory)
    load_tokenizer("tiny-random").save_pretrained(directory)
    hf = AutoModelForCausalLM.from_pretrained(directory, dtype=BF16, attn_implementation="eager")
    return load_model(str(directory), device="cpu", dtype="bfloat16", fast=fast), hf.eval()


def _gemma2(fast: bool):
    """TransformerLens 3.9 reads no Gemma 2 config from a directory: the config its official
    gemma-2 entries use, at tiny sizes, and its own Gemma weight conversion."""
    config = Gemma2Config(**HF_SHAPE, num_key_value_heads=2, head_dim=16, sliding_window=4,
                          attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
                          query_pre_attn_scalar=16, attn_implementation="eager")  # fmt: skip
    torch.manual_seed(0)
    hf = _randomized(Gemma2ForCausalLM(config), unit_norms=False).to(BF16)
    cfg = HookedTransformerConfig(
        d_model=64, d_head=16, n_heads=4, d_mlp=128, n_layers=2, n_ctx=64, eps=1e-6, d_vocab=259,
        act_fn="gelu_pytorch_tanh", normalization_type="RMS", positional_embedding_type="rotary",
        rotary_dim=16, rotary_base=10000.0, use_attn_scale=True, n_key_value_heads=2,
        use_local_attn=True, window_size=4, attn_types=["local", "global"],
        attn_scores_soft_cap=5.0, output_logits_soft_cap=3.0, gated_mlp=True, final_rms=True,
        use_normalization_before_and_after=True, original_architecture="Gemma2ForCausalLM",
        dtype=BF16,
    )  # fmt: skip
    tl = HookedTransformer(cfg)
    tl.load_state_dict(tl.fill_missing_keys(convert_gemma_weights(hf, cfg)))
    tl.tokenizer = load_tokenizer("tiny-random")
    return (accelerate(tl) if fast else tl.eval()), hf


@pytest.fixture(
    scope="module",
    params=[(family, fast) for family in ACCEL_FAMILIES for fast in (True, False)],
    ids=lambda p: f"{p[0]}-{'fast' if p[1] else 'stock'}",
)
def tl_hf(request, tmp_path_factory):
    family, fast = request.param
    if family == "llama-like":  # the embedded tiny model is a Llama
        hf, _ = load_hf_model("tiny-random", dtype="bfloat16")
        return load_model("tiny-random", dtype="bfloat16", fast=fast), hf.eval()
    if family == "gemma2-like":
        return _gemma2(fast)
    return _from_directory(family, tmp_path_factory.mktemp("hf"), fast)


def test_bf16_transformerlens_matches_transformers(tl_hf) -> None:
    """Logits and the residual stream after each block but the last (transformers' last hidden
    state is after the final norm) at real positions; the layer convention of FACTS.md."""
    tl, hf = tl_hf
    assert tl.cfg.dtype == BF16 and next(hf.parameters()).dtype == BF16
    tokens, mask, real = _real_batch()
    with torch.inference_mode():
        out = hf(tokens, attention_mask=mask, output_hidden_states=True)
        logits, cache = tl.run_with_cache(tokens, attention_mask=mask, names_filter=_resid)
    assert max_rel_diff(out.logits[real], logits[real]) <= TL_VS_HF
    for layer in range(tl.cfg.n_layers - 1):
        got = cache[f"blocks.{layer}.{RESID}"][real]
        assert max_rel_diff(out.hidden_states[layer + 1][real], got) <= TL_VS_HF, layer


def test_bf16_greedy_tokens_match_transformers(tl_hf) -> None:
    tl, hf = tl_hf
    prompts, responses = _greedy(tl)
    assert greedy_disagreements(lambda t: hf(t).logits, prompts, responses, TL_VS_HF) == []
