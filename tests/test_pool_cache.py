"""The activations pass keeps no keys/values it never reads: its KV cache holds the shared prompt
prefix and nothing more after the pass (before, it grew by every token of every row, about the
size of the captured residuals), and the pooled values are those of a pass without any cache."""

from __future__ import annotations

import pytest
import torch
from conftest import MIXED_LENGTH_TEXTS, chat_ids, fast_and_stock

import tlextract.ops.pool as pool
from tlextract.model.tokens import left_pad, text_ids

pytestmark = pytest.mark.usefixtures("one_thread")
tiny_model = fast_and_stock("tiny-random")


def _spy(monkeypatch) -> list[tuple[object, int]]:  # type: ignore[no-untyped-def]
    seen: list[tuple[object, int]] = []
    original = pool.prefix_cache

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        cache, n = original(*args, **kwargs)
        seen.append((cache, n))
        return cache, n

    monkeypatch.setattr(pool, "prefix_cache", spy)
    return seen


def _reference(model, prompts, responses, layers) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """run_with_cache on the whole padded batch, no KV cache: the mean over response tokens."""
    full = [p + r for p, r in zip(prompts, responses, strict=True)]
    tokens, mask = left_pad(full, model.tokenizer.pad_token_id, "cpu")
    names = [pool.hook_name("resid_post", layer) for layer in layers]
    with torch.inference_mode():
        _, acts = model.run_with_cache(tokens, attention_mask=mask, names_filter=names)
    out = []
    for i, r in enumerate(responses):
        out.append(torch.stack([acts[n][i, -len(r) :].mean(dim=0) for n in names]))
    return torch.stack(out)


@pytest.mark.parametrize("hooked", [False, True], ids=["prefix shared", "hooked, no prefix"])
def test_the_pass_keeps_only_the_shared_prefix(tiny_model, monkeypatch, hooked) -> None:
    prompts = chat_ids(tiny_model, MIXED_LENGTH_TEXTS)
    responses = text_ids(tiny_model, [f"reply {i} " * (i + 1) for i in range(len(prompts))])
    layers = list(range(tiny_model.cfg.n_layers))
    seen = _spy(monkeypatch)
    hooks = [("blocks.0.hook_resid_pre", lambda act, hook: None)] if hooked else []
    with tiny_model.hooks(fwd_hooks=hooks):
        pooled = pool.pooled_activations(tiny_model, prompts, responses, layers)
    [(cache, shared)] = seen
    assert (shared > 0) != hooked  # both cases are reached
    for entry in cache.entries:  # type: ignore[attr-defined]
        assert entry.past_keys.shape[1] == shared
        assert entry.past_values.shape[1] == shared
    assert cache.previous_attention_mask.shape[1] == shared  # type: ignore[attr-defined]
    expected = _reference(tiny_model, prompts, responses, layers)
    torch.testing.assert_close(pooled, expected, rtol=1e-5, atol=1e-5)
