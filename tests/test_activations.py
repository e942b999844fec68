"""Pooling never sees padding or prompt tokens; captured activations equal a fresh pass."""

from __future__ import annotations

import pytest
import torch
from conftest import fast_and_stock

from tlextract.errors import TLExtractError
from tlextract.ops.pool import masked_mean, pack, pooled_activations, resolve_layers

pytestmark = pytest.mark.usefixtures("one_thread")
tiny_model = fast_and_stock("tiny-random")  # every test here on both

PROMPTS = ["Hi", "A much longer prompt with many more tokens in it than the others", "Mid size"]
RESPONSES = [" ok then", " x", " a fairly long response that goes on for a while"]


def _ids(model, texts):
    return [model.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def test_masked_mean_ignores_masked_positions() -> None:
    resid = torch.arange(2 * 1 * 3 * 2, dtype=torch.float32).reshape(2, 1, 3, 2)
    mask = torch.tensor([[False, True, True], [False, False, True]])
    out = masked_mean(resid, mask)
    assert torch.equal(out[0, 0], resid[0, 0, 1:].mean(0))
    assert torch.equal(out[1, 0], resid[1, 0, 2])


def test_pack_marks_only_response_positions() -> None:
    tokens, attn, resp = pack([[1, 2], [3]], [[7], [8]], pad_id=0, device="cpu")
    assert tokens.tolist() == [[1, 2, 7], [0, 3, 8]]
    assert attn.tolist() == [[1, 1, 1], [0, 1, 1]]
    assert resp.tolist() == [[False, False, True], [False, False, True]]


def test_pooled_equals_fresh_unpadded_pass(tiny_model) -> None:
    layers = list(range(tiny_model.cfg.n_layers))
    p, r = _ids(tiny_model, PROMPTS), _ids(tiny_model, RESPONSES)
    batched = pooled_activations(tiny_model, p, r, layers)
    for i in range(len(p)):
        tokens = torch.tensor([p[i] + r[i]])
        _, cache = tiny_model.run_with_cache(tokens)
        for j, layer in enumerate(layers):
            ref = cache[f"blocks.{layer}.hook_resid_post"][0, len(p[i]) :].mean(0)
            torch.testing.assert_close(batched[i, j], ref, rtol=1e-5, atol=1e-5)


def test_padding_never_enters_the_mean(tiny_model) -> None:
    """The same example pooled alone, with different partners and in different batch sizes."""
    layers = [0, tiny_model.cfg.n_layers - 1]
    p, r = _ids(tiny_model, PROMPTS), _ids(tiny_model, RESPONSES)
    alone = pooled_activations(tiny_model, p[:1], r[:1], layers)[0]
    with_long = pooled_activations(tiny_model, [p[0], p[1]], [r[0], r[1]], layers)[0]
    in_three = pooled_activations(tiny_model, [p[2], p[1], p[0]], [r[2], r[1], r[0]], layers)[2]
    torch.testing.assert_close(with_long, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(in_three, alone, rtol=1e-5, atol=1e-5)


def test_resolve_layers_rejects_missing_blocks() -> None:
    assert resolve_layers("all", 3) == (0, 1, 2)
    assert resolve_layers([2, 0, 2], 3) == (0, 2)
    with pytest.raises(
        TLExtractError, match=r"layers \[3\] do not exist: this model has blocks 0..2"
    ):
        resolve_layers([1, 3], 3)


def test_shape_annotations_are_checked_while_testing() -> None:
    """jaxtyping's pytest hook is on: a wrong shape fails loudly instead of broadcasting."""
    from jaxtyping import TypeCheckError

    resid = torch.zeros(2, 1, 3, 4)
    with pytest.raises(TypeCheckError):
        masked_mean(resid, torch.ones(2, 5, dtype=torch.bool))  # 5 positions, resid has 3
