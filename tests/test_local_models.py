"""The architecture matrix: each tiny checkpoint of tests/tiny_checkpoints.py loaded from its
directory through the public ``load_model``, on each backend that loads it, against transformers
itself (the independent reference): greedy tokens equal ``generate``'s, residuals at every layer
equal ``output_hidden_states``, pooled activations equal their mean over the response.

Tolerance (float32): max |got - ref| <= 1e-5 * max |ref| over each compared tensor. The residuals
reach ~90 here, where float32 rounds to ~1e-5; a padded batch's matrix products round
differently from one prompt's alone, so the worst case seen is 3e-6 of the largest value
(Mistral), while a wrong position, mask or cache is off by order 1.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import cache
from pathlib import Path

import pytest
import torch
from tiny_checkpoints import ARCHITECTURES, BOS, save_checkpoint
from torch import Tensor
from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge
from transformers import AutoModelForCausalLM, PreTrainedModel

import tlextract
from tlextract.config import GenerationSettings
from tlextract.errors import TLExtractError
from tlextract.model.decoding import Model
from tlextract.model.load import load_tokenizer, model_info
from tlextract.model.source import resolve_model
from tlextract.model.tokens import left_pad, stop_token_ids
from tlextract.ops.generate import generate_batch
from tlextract.ops.pool import pooled_activations

pytestmark = pytest.mark.usefixtures("one_thread")

RTOL = 1e-5
NEW_TOKENS = 8
# Lengths 9, 3 and 6: two longer than Gemma's sliding window (4), heavy left padding for one.
PROMPT_LENGTHS = (9, 3, 6)
RESPONSE_LENGTHS = (3, 5, 4)


# What HookedTransformer builds from a directory as transformers computes it (measured here):
# TransformerLens has no converter for Gemma 2/3, OLMo 2, Qwen3-MoE or GPT-2 from a directory,
# its Phi-3 conversion does not fit the weights, and its llama one has no scaled RoPE.
HOOKED = frozenset({"qwen2", "qwen3", "mistral"})


def _hooked(arch: str) -> bool:
    """Whether ``auto`` takes HookedTransformer for this checkpoint."""
    return arch in HOOKED


CASES = [(a, "bridge") for a in ARCHITECTURES] + [
    (a, "hooked") for a in ARCHITECTURES if _hooked(a)
]


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Each architecture's directory, written once per session."""
    root = tmp_path_factory.mktemp("checkpoints")
    return cache(lambda arch: save_checkpoint(arch, root / arch))


@cache
def _loaded(directory: Path, backend: str) -> Model:
    return tlextract.load_model(str(directory), dtype="float32", backend=backend)


@cache
def _reference(directory: Path) -> PreTrainedModel:
    hf: PreTrainedModel = AutoModelForCausalLM.from_pretrained(
        directory, attn_implementation="eager", dtype=torch.float32
    )
    return hf.eval()


def _ids(lengths: tuple[int, ...], seed: int, bos: bool) -> list[list[int]]:
    """Random ids of these lengths, none of them special (pad, BOS, EOS); BOS first if asked."""
    gen = torch.Generator().manual_seed(seed)
    return [
        [BOS] * bos + torch.randint(3, 259, (n - bos,), generator=gen).tolist() for n in lengths
    ]


PROMPTS = _ids(PROMPT_LENGTHS, 0, bos=True)
RESPONSES = _ids(RESPONSE_LENGTHS, 1, bos=False)


@cache
def _hf_greedy(directory: Path) -> list[tuple[list[int], bool]]:
    """transformers' greedy response to each prompt alone: its tokens before a stop token (the
    tokenizer's, as tlextract stops), and whether one ended it."""
    hf = _reference(directory)
    stops = stop_token_ids(load_tokenizer(str(directory)))
    responses = []
    for prompt in PROMPTS:
        out = hf.generate(  # type: ignore[operator]
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            eos_token_id=stops,
            pad_token_id=0,
        )
        new = out[0, len(prompt) :].tolist()
        stopped = bool(new) and new[-1] in stops
        responses.append((new[:-1] if stopped else new, stopped))
    return responses


def _greedy(model: Model) -> list[tuple[list[int], bool]]:
    settings = GenerationSettings(max_new_tokens=NEW_TOKENS, do_sample=False)
    gens = generate_batch(model, PROMPTS, settings, seeds=[0, 1, 2])
    return [(g.response_ids, g.stopped) for g in gens]


@pytest.mark.parametrize(("arch", "backend"), CASES)
def test_greedy_tokens_equal_transformers_generate(
    checkpoint: Callable[[str], Path], arch: str, backend: str
) -> None:
    directory = checkpoint(arch)
    model = _loaded(directory, backend)
    assert model_info(model)["backend"] == backend
    want = _hf_greedy(directory)
    assert _greedy(model) == want
    # Random weights that repeat one token would hide a wrong cache or position.
    assert all(len(set(tokens)) > 2 for tokens, _ in want)


def _hidden_states(hf: PreTrainedModel, ids: list[int]) -> tuple[list[Tensor], Tensor]:
    """transformers' ``hidden_states`` of ``ids`` alone, and the last decoder layer's output (a
    forward hook: the last entry of ``hidden_states`` is the final norm's output instead)."""
    layers = hf.base_model.layers if hasattr(hf.base_model, "layers") else hf.base_model.h
    seen: list[Tensor] = []
    handle = layers[-1].register_forward_hook(
        lambda _m, _i, out: seen.append(out[0] if isinstance(out, tuple) else out)
    )
    try:
        with torch.inference_mode():
            out = hf(torch.tensor([ids]), output_hidden_states=True)
    finally:
        handle.remove()
    return [h[0] for h in out.hidden_states], seen[0][0]


def _assert_close(got: Tensor, ref: Tensor) -> None:
    diff = float((got.double() - ref.double()).abs().max())
    assert diff <= RTOL * float(ref.abs().max()), (
        f"max |diff| {diff:.3g}, max |ref| {ref.abs().max():.3g}"
    )


def _run_with_cache(model: Model, seqs: list[list[int]]) -> tuple[dict[str, Tensor], Tensor]:
    """The residual hooks' activations from ``run_with_cache`` of the left-padded batch (the
    attention mask alone tells either backend where each row starts), and the mask."""
    tokens, attn = left_pad(seqs, 0, "cpu")
    with torch.inference_mode():
        _, acts = model.run_with_cache(
            tokens,
            attention_mask=attn,
            return_type=None,
            names_filter=lambda name: name.endswith(("hook_resid_pre", "hook_resid_post")),
        )
    return dict(acts.items()), attn


@pytest.mark.parametrize(("arch", "backend"), CASES)
def test_residuals_equal_hidden_states(
    checkpoint: Callable[[str], Path], arch: str, backend: str
) -> None:
    directory = checkpoint(arch)
    model = _loaded(directory, backend)
    hf = _reference(directory)
    n = model.cfg.n_layers
    acts, attn = _run_with_cache(model, PROMPTS)
    for row, prompt in enumerate(PROMPTS):
        real = attn[row].bool()
        hidden, last_output = _hidden_states(hf, prompt)
        for layer in range(n):
            got = acts[f"blocks.{layer}.hook_resid_pre"][row, real]
            _assert_close(got, hidden[layer])
        resid_post = acts[f"blocks.{n - 1}.hook_resid_post"][row, real]
        _assert_close(resid_post, last_output)
        with torch.inference_mode():
            final = model.ln_final(resid_post)
        _assert_close(final, hidden[n])


@pytest.mark.parametrize(("arch", "backend"), CASES)
def test_pooled_activations_equal_mean_hidden_states(
    checkpoint: Callable[[str], Path], arch: str, backend: str
) -> None:
    directory = checkpoint(arch)
    model = _loaded(directory, backend)
    hf = _reference(directory)
    pooled = pooled_activations(model, PROMPTS, RESPONSES, layers=[0], hook="resid_post")
    for row, (prompt, response) in enumerate(zip(PROMPTS, RESPONSES, strict=True)):
        hidden, _ = _hidden_states(hf, prompt + response)
        want = hidden[1][len(prompt) :].mean(0)  # block 0's output is hidden_states[1]
        _assert_close(pooled[row, 0], want)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_auto_backend(checkpoint: Callable[[str], Path], arch: str) -> None:
    """``auto`` keeps HookedTransformer for the architectures it is proven on, else the bridge."""
    source = resolve_model(str(checkpoint(arch)), backend="auto")
    assert source.backend == ("hooked" if _hooked(arch) else "bridge")


@pytest.mark.parametrize("arch", [a for a in ARCHITECTURES if not _hooked(a)])
def test_hooked_refuses_what_it_cannot_build(checkpoint: Callable[[str], Path], arch: str) -> None:
    """One line pointing to the bridge, whether TransformerLens has no config for the
    architecture or its converter does not fit the checkpoint (Phi-3)."""
    with pytest.raises(TLExtractError, match='backend="bridge"'):
        tlextract.load_model(str(checkpoint(arch)), dtype="float32", backend="hooked")


def test_llama3_scaled_rope_is_the_bridges(checkpoint: Callable[[str], Path]) -> None:
    """HookedTransformer's llama conversion has no scaled RoPE: refused, and auto takes the
    bridge."""
    directory = checkpoint("llama3")
    with pytest.raises(TLExtractError, match="scaled RoPE"):
        tlextract.load_model(str(directory), dtype="float32", backend="hooked")
    assert model_info(_loaded(directory, "auto"))["backend"] == "bridge"


def test_cache_shim_is_what_makes_bridge_generation_right(
    checkpoint: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """On this transformers (>= 5.24: the KV cache reaches attention as ``cache=``), the bridge
    without tlextract's shim decodes wrongly; with it, as transformers does."""
    directory = checkpoint("llama3")
    model = _loaded(directory, "bridge")  # installs the shim
    want = _hf_greedy(directory)
    shimmed = AttentionBridge._update_kv_cache
    monkeypatch.setattr(AttentionBridge, "_update_kv_cache", shimmed.__wrapped__)  # type: ignore[attr-defined]
    assert _greedy(model) != want
    monkeypatch.undo()
    assert AttentionBridge._update_kv_cache is shimmed
    assert _greedy(model) == want


@pytest.mark.parametrize("backend", ["auto", "hooked", "bridge"])
def test_unsupported_architecture_is_one_line_naming_it(tmp_path: Path, backend: str) -> None:
    """Refused from config.json alone: the directory holds no weights to load."""
    config = {"architectures": ["NoSuchForCausalLM"], "model_type": "llama"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(TLExtractError, match="NoSuchForCausalLM"):
        tlextract.load_model(str(tmp_path), dtype="float32", backend=backend)


def test_bfloat16_bridge_greedy_equals_transformers(checkpoint: Callable[[str], Path]) -> None:
    """The bridge in bfloat16 (what a GPU run loads) decodes as transformers does in bfloat16."""
    directory = checkpoint("llama3")
    model = tlextract.load_model(str(directory), dtype="bfloat16")
    assert model_info(model)["backend"] == "bridge" and model.cfg.dtype == torch.bfloat16
    hf = AutoModelForCausalLM.from_pretrained(
        directory, attn_implementation="eager", dtype=torch.bfloat16
    ).eval()
    greedy = GenerationSettings(max_new_tokens=8, do_sample=False)
    gens = generate_batch(model, PROMPTS, greedy, seeds=[0] * len(PROMPTS))
    for prompt, gen in zip(PROMPTS, gens, strict=True):
        with torch.inference_mode():
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)
        assert gen.response_ids == out[0, len(prompt) :].tolist()[: len(gen.response_ids)]
