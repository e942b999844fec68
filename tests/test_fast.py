"""accelerate() against a fresh unaccelerated model: same logits, same activation at every hook
point, same greedy generations, same pooled activations; hooks fire as often as before.

Real models (tiny-random, and SmolLM2 marked slow) plus small random TransformerLens configs that
reach the code paths those two do not: multi-head attention, adjacent-pair and partial rotary,
local attention windows, QK-norm, soft-capping, norms after attention/MLP, biases, LayerNorm and
absolute positions."""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable

import pytest
import torch
from conftest import chat_ids
from tiny_families import FAMILIES
from torch import Tensor
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
from transformer_lens.components import GroupedQueryAttention, TransformerBlock

from tlextract.config import GenerationSettings
from tlextract.model.accel import accelerate, has_hooks
from tlextract.model.load import load_model
from tlextract.model.tokens import left_pad
from tlextract.ops.generate import generate_batch, prefix_cache
from tlextract.ops.pool import pooled_activations

pytestmark = pytest.mark.usefixtures("one_thread")

# Very different lengths, so left padding is heavy for the short ones.
TEXTS = [
    "Hi",
    "What is the capital of France? Please answer briefly and clearly, thanks.",
    "Tell me a long story about a cat who lived in a lighthouse by the sea, loved fish, and "
    "once met a seagull who could talk about the weather and the tides all day long.",
    "2+2?",
    "Name three colours.",
]

REAL_MODELS = [
    pytest.param("tiny-random", id="tiny-random"),
    pytest.param("smollm2-135m-instruct", id="smollm2", marks=pytest.mark.slow),
]


def assert_close(ref: Tensor, got: Tensor, what: str = "", rel: float = 1e-4) -> None:
    """Equal up to float32 rounding: ``rel`` times the reference's largest magnitude."""
    assert ref.shape == got.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    ref, got = ref.double(), got.double()
    finite = ref.isfinite()  # masked attention scores are -inf in both
    assert torch.equal(finite, got.isfinite()), f"{what}: inf/nan at other positions"
    assert torch.equal(ref[~finite].nan_to_num(), got[~finite].nan_to_num()), what
    ref, got = ref[finite], got[finite]
    tol = rel * ref.abs().max().item() + 1e-6 if ref.numel() else 0.0
    diff = (ref - got).abs().max().item() if ref.numel() else 0.0
    assert diff <= tol, f"{what}: max |diff| {diff:.3g} > {tol:.3g}"


def assert_caches_equal(ref: dict[str, Tensor], got: dict[str, Tensor]) -> None:
    assert sorted(got.keys()) == sorted(ref.keys())
    for name in ref.keys():
        assert_close(ref[name], got[name], name)


def count_hook_calls(model: HookedTransformer, run: Callable[[], object]) -> Counter[str]:
    calls: Counter[str] = Counter()

    def count(act: Tensor, hook) -> None:
        calls[hook.name] += 1

    with model.hooks(fwd_hooks=[(lambda name: True, count)]):
        run()
    return calls


# --- real models ---


@pytest.fixture(scope="module", params=REAL_MODELS)
def pair(request) -> tuple[HookedTransformer, HookedTransformer]:
    """(fresh unaccelerated model, accelerated model), loaded separately."""
    ref = load_model(request.param, fast=False)
    fast = load_model(request.param)
    return ref, fast


def prompt_ids(model: HookedTransformer) -> list[list[int]]:
    tok = model.tokenizer
    if model.cfg.model_name == "tiny-random":
        return [tok(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    return chat_ids(model, TEXTS)


def batch(model: HookedTransformer) -> tuple[Tensor, Tensor]:
    return left_pad(prompt_ids(model), model.tokenizer.pad_token_id, "cpu")


def test_components_are_swapped_and_names_kept(pair) -> None:
    ref, fast = pair
    attn = fast.blocks[0].attn
    assert type(attn) is not type(ref.blocks[0].attn)  # accelerated...
    assert isinstance(attn, GroupedQueryAttention)  # ...but still what it was
    assert isinstance(fast.blocks[0], TransformerBlock)
    assert repr(fast) == repr(ref)
    assert sorted(fast.hook_dict) == sorted(ref.hook_dict)
    sd_ref, sd_fast = ref.state_dict(), fast.state_dict()
    assert list(sd_fast) == list(sd_ref)
    assert all(torch.equal(sd_ref[k], sd_fast[k]) for k in sd_ref)
    # idempotent
    before = [type(m) for m in fast.modules()]
    accelerate(fast)
    assert [type(m) for m in fast.modules()] == before


def test_logits_equal_without_hooks(pair) -> None:
    ref, fast = pair
    tokens, mask = batch(ref)
    with torch.inference_mode():
        expected = ref(tokens, attention_mask=mask)
        got = fast(tokens, attention_mask=mask)
    assert_close(expected, got, "logits")  # every position, padding included


def test_logits_equal_with_autograd_on(pair) -> None:
    ref, fast = pair
    tokens, mask = batch(ref)
    expected = ref(tokens[:2], attention_mask=mask[:2])
    got = fast(tokens[:2], attention_mask=mask[:2])
    assert got.requires_grad
    assert_close(expected.detach(), got.detach(), "logits")


def test_run_with_cache_records_every_activation_equal(pair) -> None:
    ref, fast = pair
    tokens, mask = batch(ref)
    with torch.inference_mode():
        logits_ref, cache_ref = ref.run_with_cache(tokens, attention_mask=mask)
        logits_fast, cache_fast = fast.run_with_cache(tokens, attention_mask=mask)
    assert len(cache_fast) == len(cache_ref) == len(ref.hook_dict) - _unused_hooks(ref)
    assert_caches_equal(cache_ref, cache_fast)
    assert_close(logits_ref, logits_fast, "logits")


def _unused_hooks(model: HookedTransformer) -> int:
    """Hook points TransformerLens creates but never calls with this configuration."""
    with torch.inference_mode():
        fired = count_hook_calls(model, lambda: model(torch.tensor([[1, 2]])))
    return len(model.hook_dict) - len(fired)


def test_hooks_fire_as_often_as_before(pair) -> None:
    ref, fast = pair
    tokens, mask = batch(ref)
    with torch.inference_mode():
        calls_ref = count_hook_calls(ref, lambda: ref(tokens, attention_mask=mask))
        calls_fast = count_hook_calls(fast, lambda: fast(tokens, attention_mask=mask))
    assert calls_fast == calls_ref
    assert calls_ref["blocks.0.ln1.hook_normalized"] == 3  # Q, K and V inputs


def test_filtered_run_with_cache_stop_at_layer(pair) -> None:
    """The call pooled_activations makes: a few hooks, no logits, early stop."""
    ref, fast = pair
    tokens, mask = batch(ref)
    names = ["blocks.0.hook_resid_post", "blocks.1.attn.hook_z", "blocks.1.hook_resid_post"]
    kwargs = dict(attention_mask=mask, names_filter=names, return_type=None, stop_at_layer=2)
    with torch.inference_mode():
        _, cache_ref = ref.run_with_cache(tokens, **kwargs)
        _, cache_fast = fast.run_with_cache(tokens, **kwargs)
    assert_caches_equal(cache_ref, cache_fast)


def test_kv_cache_decoding_gives_the_same_logits(pair) -> None:
    ref, fast = pair
    tokens, mask = batch(ref)
    steps = torch.tensor([[5], [6], [7], [8], [9]]).T.repeat(tokens.shape[0], 1)
    logits = []
    for model in (ref, fast):
        cache = TransformerLensKeyValueCache.init_cache(model.cfg, "cpu", tokens.shape[0])
        out = [model(tokens, attention_mask=mask, past_kv_cache=cache)[:, -1]]
        for j in range(steps.shape[1]):
            new = steps[:, j : j + 1]
            out.append(model(new, attention_mask=torch.ones_like(new), past_kv_cache=cache)[:, -1])
        logits.append(torch.stack(out, 1).detach())
    assert_close(logits[0], logits[1], "decode logits")


def test_greedy_generation_is_token_identical(pair) -> None:
    ref, fast = pair
    ids = prompt_ids(ref)
    settings = GenerationSettings(max_new_tokens=40, do_sample=False)
    expected = generate_batch(ref, ids, settings, seeds=[0] * len(ids))
    got = generate_batch(fast, ids, settings, seeds=[0] * len(ids))
    assert [g.response_ids for g in got] == [g.response_ids for g in expected]
    assert [g.stopped for g in got] == [g.stopped for g in expected]
    assert sum(len(g.response_ids) for g in got) > len(ids)  # something was generated


def test_sampled_generation_is_token_identical(pair) -> None:
    ref, fast = pair
    ids = prompt_ids(ref)
    settings = GenerationSettings(max_new_tokens=12, do_sample=True, temperature=1.0, top_p=0.9)
    expected = generate_batch(ref, ids, settings, seeds=range(len(ids)))
    got = generate_batch(fast, ids, settings, seeds=range(len(ids)))
    assert [g.response_ids for g in got] == [g.response_ids for g in expected]


def test_captured_and_teacher_forced_pooled_activations_equal(pair) -> None:
    ref, fast = pair
    ids = prompt_ids(ref)
    n = ref.cfg.n_layers
    layers = sorted({0, n // 2, n - 1})
    names = [f"blocks.{layer}.hook_resid_post" for layer in layers]
    settings = GenerationSettings(max_new_tokens=10, do_sample=False)
    expected = generate_batch(ref, ids, settings, seeds=[0] * len(ids), capture=names)
    got = generate_batch(fast, ids, settings, seeds=[0] * len(ids), capture=names)
    assert [g.response_ids for g in got] == [g.response_ids for g in expected]
    for e, g in zip(expected, got, strict=True):
        if e.pooled is None:
            assert g.pooled is None
        else:
            assert_close(e.pooled, g.pooled, "captured pooled")
    keep = [i for i, g in enumerate(expected) if g.response_ids]
    responses = [expected[i].response_ids for i in keep]
    prompts = [ids[i] for i in keep]
    for hook in ("resid_pre", "resid_mid", "resid_post"):
        assert_close(
            pooled_activations(ref, prompts, responses, layers, hook),
            pooled_activations(fast, prompts, responses, layers, hook),
            f"pooled {hook}",
        )


# --- small random configurations ---


BASE = dict(
    n_layers=2,
    d_model=48,
    n_ctx=64,
    d_head=12,
    n_heads=4,
    d_vocab=61,
    d_mlp=96,
    act_fn="silu",
    normalization_type="RMS",
    positional_embedding_type="rotary",
    rotary_dim=12,
    gated_mlp=True,
    final_rms=True,
)
CONFIGS = {
    "llama-gqa": dict(n_key_value_heads=2),
    "mha-adjacent-partial-rotary": dict(rotary_adjacent_pairs=True, rotary_dim=8),
    "gemma3-like": dict(
        n_key_value_heads=1,
        use_qk_norm=True,
        use_local_attn=True,
        attn_types=["local", "global"],
        window_size=3,
        rotary_base_local=100,
        use_normalization_before_and_after=True,
        act_fn="gelu_pytorch_tanh",
    ),
    "gemma2-like": FAMILIES["gemma2-like"],
    "gpt2-like": dict(
        normalization_type="LN",
        positional_embedding_type="standard",
        gated_mlp=False,
        act_fn="gelu_new",
        final_rms=False,
    ),
}


def random_model(name: str) -> HookedTransformer:
    cfg = HookedTransformerConfig(**{**BASE, **CONFIGS[name]}, seed=0)
    model = HookedTransformer(cfg)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for pname, p in model.named_parameters():  # biases too, and norm weights near 1
            noise = torch.randn(p.shape, generator=gen) * (0.1 if pname.endswith(".w") else 0.3)
            p.copy_(noise + (1.0 if pname.endswith(".w") else 0.0))
    return model.eval()


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def random_pair(request) -> tuple[HookedTransformer, HookedTransformer]:
    ref = random_model(request.param)
    fast = accelerate(copy.deepcopy(ref))
    for b_ref, b_fast in zip(ref.blocks, fast.blocks, strict=True):  # the fast paths are taken
        assert type(b_fast) is not type(b_ref)
        assert type(b_fast.attn) is not type(b_ref.attn)
    return ref, fast


def random_batch(seed: int = 0) -> tuple[Tensor, Tensor]:
    """Left-padded random tokens of lengths 9, 3, 1 and 6."""
    gen = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(1, 61, (n,), generator=gen).tolist() for n in (9, 3, 1, 6)]
    return left_pad(seqs, 0, "cpu")


def test_random_config_activations_and_logits(random_pair) -> None:
    ref, fast = random_pair
    tokens, mask = random_batch()
    with torch.inference_mode():
        logits_ref, cache_ref = ref.run_with_cache(tokens, attention_mask=mask)
        logits_fast, cache_fast = fast.run_with_cache(tokens, attention_mask=mask)
        assert_caches_equal(cache_ref, cache_fast)
        assert_close(logits_ref, logits_fast, "logits, all hooked")
        assert_close(ref(tokens, attention_mask=mask), fast(tokens, attention_mask=mask), "logits")
        assert_close(ref(tokens[:1]), fast(tokens[:1]), "logits, no attention mask")
        calls_ref = count_hook_calls(ref, lambda: ref(tokens, attention_mask=mask))
        calls_fast = count_hook_calls(fast, lambda: fast(tokens, attention_mask=mask))
    assert calls_fast == calls_ref


def test_random_config_kv_cache_decoding(random_pair) -> None:
    ref, fast = random_pair
    tokens, mask = random_batch()
    for sdpa in (True, False):
        accelerate(fast, sdpa=sdpa)
        outs = []
        for model in (ref, fast):
            cache = TransformerLensKeyValueCache.init_cache(model.cfg, "cpu", tokens.shape[0])
            with torch.inference_mode():
                steps = [model(tokens, attention_mask=mask, past_kv_cache=cache)]
                for t in range(7):  # past the local windows
                    new = torch.full((tokens.shape[0], 1), 3 + t)
                    steps.append(
                        model(new, attention_mask=torch.ones_like(new), past_kv_cache=cache)
                    )
            outs.append(torch.cat(steps, dim=1))
        assert_close(outs[0], outs[1], f"decode logits (sdpa={sdpa})")
    accelerate(fast, sdpa=True)


def test_random_config_shared_prefix_decodes_like_full_prompts(random_pair) -> None:
    """Rows sharing 5 tokens, then tails of 3, 1 and 2: the prefix computed once (rows then
    have padding between prefix and tail) gives the logits of the unshared, left-padded batch,
    on TransformerLens' own code and the accelerated one; local windows never share."""
    seqs = [[7, 8, 9, 10, 11, *tail] for tail in ([1, 2, 3], [4], [5, 6])]
    for model in random_pair:
        outs = []
        for share in (False, True):
            with torch.inference_mode():
                cache, n = prefix_cache(model, seqs, min(map(len, seqs)) - 1, share)
                tokens, mask = left_pad([s[n:] for s in seqs], 0, "cpu")
                steps = [model(tokens, attention_mask=mask, past_kv_cache=cache)[:, -1:]]
                for t in range(3):
                    new = torch.full((len(seqs), 1), 3 + t)
                    steps.append(
                        model(new, attention_mask=torch.ones_like(new), past_kv_cache=cache)
                    )
            outs.append(torch.cat(steps, dim=1))
        assert n == (0 if model.cfg.use_local_attn else 5)
        assert_close(outs[0], outs[1], "logits with a shared prefix")


def test_hooks_that_edit_activations_act_the_same(random_pair) -> None:
    ref, fast = random_pair
    tokens, mask = random_batch(1)

    def zero_head(act: Tensor, hook) -> Tensor:
        act = act.clone()
        act[:, :, 0] = 0.0
        return act

    def scale(act: Tensor, hook) -> Tensor:
        return act * 0.5

    hooks = [
        ("blocks.0.attn.hook_v", zero_head),
        ("blocks.0.ln1.hook_normalized", scale),
        ("blocks.1.attn.hook_z", zero_head),
        ("blocks.1.hook_resid_mid", scale),
    ]
    with torch.inference_mode():
        expected = ref.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=hooks)
        got = fast.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=hooks)
        plain = fast(tokens, attention_mask=mask)
    assert_close(expected, got, "hooked logits")
    assert (got - plain).abs().max() > 1e-3  # the hooks did something


def test_has_hooks_ignores_only_accelerates_own_pre_hook(random_pair) -> None:
    _, fast = random_pair
    assert not has_hooks(fast)
    with fast.hooks(fwd_hooks=[("blocks.0.hook_resid_post", lambda act, hook: None)]):
        assert has_hooks(fast)
    handle = fast.register_forward_pre_hook(lambda module, args: None)
    assert has_hooks(fast)
    handle.remove()
    assert not has_hooks(fast)


def test_weight_edits_after_accelerate_are_seen(random_pair) -> None:
    ref, fast = random_pair
    ref, fast = copy.deepcopy(ref), copy.deepcopy(fast)  # keep the shared fixture intact
    tokens, mask = random_batch(2)
    with torch.no_grad():
        for model in (ref, fast):
            model.blocks[0].attn.W_O.mul_(2.0)
            model.blocks[1].mlp.W_in.data[:, :5] = 0.0  # .data: no version bump
            model.unembed.W_U.data.neg_()
    with torch.inference_mode():
        assert_close(ref(tokens, attention_mask=mask), fast(tokens, attention_mask=mask))


def test_parameters_view_the_fused_weights_and_replaced_storage_is_refused(random_pair) -> None:
    ref, fast = random_pair
    ref, fast = copy.deepcopy(ref), copy.deepcopy(fast)
    attn = fast.blocks[0].attn
    weight, _ = attn._tlx_qkv.weight()
    assert attn.W_Q.data_ptr() == weight.data_ptr()  # Q's rows come first: no copy
    tokens, mask = random_batch(4)
    with torch.no_grad():
        for model in (ref, fast):  # new storage: the fused weight must be rebuilt from it
            model.blocks[0].attn.W_Q.data = model.blocks[0].attn.W_Q.data * 0.5
            model.unembed.W_U = torch.nn.Parameter(model.unembed.W_U * -1.0)
    with torch.inference_mode():
        assert_close(ref(tokens, attention_mask=mask), fast(tokens, attention_mask=mask))
    assert fast.blocks[0].attn.W_Q.data_ptr() == attn._tlx_qkv.weight()[0].data_ptr()


def test_weight_edits_between_generations_are_seen() -> None:
    """Packed weights live across generate_batch calls; a .data edit (no version bump) between
    two calls must reach the second."""
    ref, fast = load_model("tiny-random", fast=False), load_model("tiny-random")
    ids = prompt_ids(ref)
    settings = GenerationSettings(max_new_tokens=6, do_sample=False)
    first = generate_batch(fast, ids, settings, seeds=[0] * len(ids))
    assert first == generate_batch(ref, ids, settings, seeds=[0] * len(ids))
    for model in (ref, fast):
        model.blocks[1].mlp.W_out.data.neg_()
        model.unembed.W_U.data[:, :100] = 0.0
    second = generate_batch(fast, ids, settings, seeds=[0] * len(ids))
    assert second == generate_batch(ref, ids, settings, seeds=[0] * len(ids))
    assert second != first


def test_state_dict_round_trips_through_torch_save(random_pair, tmp_path) -> None:
    ref, fast = random_pair
    torch.save(fast.state_dict(), tmp_path / "sd.pt")
    fresh = copy.deepcopy(ref)
    fresh.load_state_dict(torch.load(tmp_path / "sd.pt"))
    tokens, mask = random_batch(2)
    with torch.inference_mode():
        assert torch.equal(fresh(tokens, attention_mask=mask), ref(tokens, attention_mask=mask))


def test_runtime_flags_fall_back_to_transformerlens(random_pair) -> None:
    ref, fast = random_pair
    ref, fast = copy.deepcopy(ref), copy.deepcopy(fast)
    tokens, mask = random_batch(3)
    for model in (ref, fast):
        model.set_use_attn_result(True)
        model.set_use_split_qkv_input(True)
    with torch.inference_mode():
        logits_ref, cache_ref = ref.run_with_cache(tokens, attention_mask=mask)
        logits_fast, cache_fast = fast.run_with_cache(tokens, attention_mask=mask)
    assert "blocks.0.attn.hook_result" in cache_fast
    assert "blocks.0.hook_q_input" in cache_fast
    assert_caches_equal(cache_ref, cache_fast)
    assert_close(logits_ref, logits_fast)
