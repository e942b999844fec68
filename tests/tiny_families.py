"""Tiny random-weight HookedTransformers shaped like the model families tlextract runs, with the
tiny-random tokenizer attached (so tlextract's generation runs on them), in any dtype with the
same weights (built in float32, then cast), in milliseconds."""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from tlextract.model.load import load_tokenizer

BASE = dict(
    n_layers=2, d_model=64, n_ctx=64, d_head=16, n_heads=4, d_vocab=259, d_mlp=128,
    act_fn="silu", normalization_type="RMS", positional_embedding_type="rotary", rotary_dim=16,
    gated_mlp=True, final_rms=True,
)  # fmt: skip
FAMILIES: dict[str, dict[str, object]] = {
    "llama-like": dict(n_key_value_heads=2, original_architecture="LlamaForCausalLM"),
    "gemma2-like": dict(
        n_key_value_heads=2,
        use_local_attn=True,
        attn_types=["global", "local"],
        window_size=4,
        attn_scores_soft_cap=5.0,
        output_logits_soft_cap=3.0,
        use_normalization_before_and_after=True,
        act_fn="gelu_pytorch_tanh",
    ),  # fmt: skip
    # TransformerLens' attention always has Q/K/V biases; random (non-zero) here, as in Qwen2.
    "qwen2-like": dict(n_key_value_heads=1, original_architecture="Qwen2ForCausalLM"),
    "neox-like": dict(
        normalization_type="LN",
        final_rms=False,
        gated_mlp=False,
        act_fn="gelu",
        rotary_dim=4,
        parallel_attn_mlp=True,
        original_architecture="GPTNeoXForCausalLM",
    ),  # fmt: skip
    "mixtral-like": dict(
        n_key_value_heads=2,
        num_experts=4,
        experts_per_token=2,
        original_architecture="MixtralForCausalLM",
    ),  # fmt: skip
}


def family_config(family: str, dtype: torch.dtype = torch.float32) -> HookedTransformerConfig:
    return HookedTransformerConfig(**{**BASE, **FAMILIES[family]}, dtype=dtype, seed=0)


def family_model(family: str, dtype: torch.dtype = torch.float32) -> HookedTransformer:
    """The family's tiny model with fixed random weights (biases too, norm weights near 1),
    loaded into a model built in ``dtype`` the way tlextract loads one (``load_state_dict``)."""
    ref = HookedTransformer(family_config(family))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            norm = name.endswith(".w")
            p.copy_(torch.randn(p.shape, generator=gen) * (0.1 if norm else 0.3) + float(norm))
    model = ref if dtype == torch.float32 else HookedTransformer(family_config(family, dtype))
    model.load_state_dict(ref.state_dict())
    model.tokenizer = load_tokenizer("tiny-random")
    return model.eval()


# bfloat16 keeps 8 significant bits: each rounding is off by at most u = 2^-8 relative.
BF16_U = 2.0**-8


def random_prompts(seed: int = 0) -> list[list[int]]:
    """Token ids of lengths 9, 3, 1 and 6 (heavy left padding for the short ones)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 259, (n,), generator=gen).tolist() for n in (9, 3, 1, 6)]


def max_rel_diff(ref: torch.Tensor, got: torch.Tensor) -> float:
    """Largest |got - ref| in units of the reference's largest magnitude."""
    ref, got = ref.double(), got.double()
    return float((got - ref).abs().max() / ref.abs().max())


def greedy_disagreements(
    ref: Callable[[torch.Tensor], torch.Tensor],
    prompts: list[list[int]],
    responses: list[list[int]],
    tol: float,
) -> list[tuple[int, int]]:
    """(prompt, step) where a greedy response's token is not the argmax of ``ref`` (token ids ->
    logits) though ``ref``'s top-2 margin there exceeds ``2 * tol * max|logit|`` (a near-tie
    may go either way in bf16)."""
    bad = []
    for i, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        if not response:
            continue
        with torch.inference_mode():
            logits = ref(torch.tensor([prompt + response]))[0, len(prompt) - 1 : -1].double()
        top2 = logits.topk(2, dim=-1).values
        sure = (top2[:, 0] - top2[:, 1]) > 2 * tol * logits.abs().max()
        wrong = logits.argmax(-1) != torch.tensor(response)
        bad += [(i, int(t)) for t in torch.nonzero(sure & wrong).flatten()]
    return bad
