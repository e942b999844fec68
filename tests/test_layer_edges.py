"""Layer indices at the edges, against transformers itself: every ``hidden_states`` entry, the
embedding and the last one included, next to TransformerLens hooks and tlextract's persona_vectors
import and export.

transformers' ``output_hidden_states`` gives n_layers + 1 entries; its last is the final norm's
output, not the last block's (measured on SmolLM2-135M: block 29's output differs from
``hidden_states[30]`` by up to 4.4e3 while every other entry matches TransformerLens to 6e-7 of its
largest value).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from transformer_lens import HookedTransformer
from transformers import PreTrainedModel

from tlextract.errors import TLExtractError
from tlextract.model.cache import DEFAULT_MODEL, TINY_MODEL
from tlextract.model.load import load_hf_model, load_model
from tlextract.ops.formats import persona_blocks, to_persona_vectors
from tlextract.ops.trait_vectors import from_persona_vectors

TEXT = "The capital of France is Paris, and the capital of Italy is Rome."

Pair = tuple[HookedTransformer, PreTrainedModel, torch.Tensor]


@pytest.fixture(
    scope="module",
    params=[TINY_MODEL, pytest.param(DEFAULT_MODEL, marks=pytest.mark.slow)],
)
def pair(request: pytest.FixtureRequest) -> Iterator[Pair]:
    """The TransformerLens model, the transformers model it was converted from, and tokens."""
    model = load_model(request.param, device="cpu")
    hf, _ = load_hf_model(request.param)
    yield model, hf, model.to_tokens(TEXT)


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal to fp32 rounding over a 30-layer forward: relative to the larger entry."""
    return bool((a - b).abs().max() <= 1e-5 * b.abs().max().clamp_min(1.0))


@pytest.fixture(scope="module")
def states(pair: Pair) -> tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
    model, hf, tokens = pair
    with torch.no_grad():
        hidden = hf(tokens, output_hidden_states=True).hidden_states
        _, cache = model.run_with_cache(tokens, return_type=None)
    return tuple(h.float() for h in hidden), {k: v.float() for k, v in cache.items()}


def test_every_hidden_state_entry_is_the_hook_tlextract_says(pair: Pair, states) -> None:
    model, hf, _ = pair
    hidden, cache = states
    n = model.cfg.n_layers
    assert len(hidden) == n + 1
    for layer in range(n):  # every block's input, hidden_states[0] (the embedding) included
        assert close(cache[f"blocks.{layer}.hook_resid_pre"], hidden[layer]), layer
    for layer in range(n - 1):  # every block's output but the last
        assert close(cache[f"blocks.{layer}.hook_resid_post"], hidden[layer + 1]), layer
    last = cache[f"blocks.{n - 1}.hook_resid_post"]
    # the last entry is the final norm's output: ln_final applied to the last block's output,
    # weight included (hook_normalized is before the weight), and not the block's output itself
    with torch.no_grad():
        assert close(hf.model.norm(last), hidden[n])
    normalized = cache["ln_final.hook_normalized"] * model.ln_final.w.detach().float()
    assert close(normalized, hidden[n])
    assert not close(last, hidden[n])
    assert (last - hidden[n]).abs().max() > 0.1 * hidden[n].abs().max()


def test_persona_export_puts_every_block_on_its_hidden_states_row(pair: Pair, states) -> None:
    model, _, _ = pair
    hidden, cache = states
    n = model.cfg.n_layers
    post = torch.stack([cache[f"blocks.{b}.hook_resid_post"][0, -1] for b in range(n)])
    with pytest.raises(TLExtractError, match="final norm's output"):
        to_persona_vectors(post, range(n), n)
    table = to_persona_vectors(post, range(n), n, skip_unsupported=True)
    assert persona_blocks(range(n), n) == list(range(n - 1))
    for row in range(1, n):  # row l + 1 = hidden_states[l + 1] = block l's output
        assert close(table[row], hidden[row][0, -1]), row
    assert torch.equal(table[n], torch.zeros_like(table[n]))  # not the last block's output
    pre = torch.stack([cache[f"blocks.{b}.hook_resid_pre"][0, -1] for b in range(n)])
    table = to_persona_vectors(pre, range(n), n, hook="resid_pre")
    for row in range(n):
        assert close(table[row], hidden[row][0, -1]), row


def test_persona_import_reads_each_row_as_the_hook_it_is(pair: Pair, states) -> None:
    model, _, _ = pair
    hidden, cache = states
    n = model.cfg.n_layers
    table = torch.stack([h[0, -1] for h in hidden])  # what persona_vectors fills its rows from
    post = from_persona_vectors(table)
    assert post.layers == tuple(range(n - 1))
    for b in post.layers:
        assert close(post[b], cache[f"blocks.{b}.hook_resid_post"][0, -1]), b
    with pytest.raises(TLExtractError, match=f"row {n} .*final norm's output"):
        from_persona_vectors(table, layers=[n - 1])
    pre = from_persona_vectors(table, hook="resid_pre")
    assert pre.layers == tuple(range(n))
    for b in pre.layers:
        assert close(pre[b], cache[f"blocks.{b}.hook_resid_pre"][0, -1]), b
