"""Batched generation against independent references: TransformerLens' own generate, and itself
run one prompt at a time."""

from __future__ import annotations

import pytest
import torch
from conftest import MIXED_LENGTH_TEXTS, chat_ids, fast_and_stock

from tlextract.config import GenerationSettings
from tlextract.model.tokens import left_pad, stop_token_ids
from tlextract.ops.generate import MIN_SHARED_PREFIX, generate_batch, prefix_cache, sample
from tlextract.ops.pool import hook_name, pooled_activations

pytestmark = pytest.mark.usefixtures("one_thread")
tiny_model = fast_and_stock("tiny-random")  # every test here on both
TEXTS = MIXED_LENGTH_TEXTS


def _ids(model, texts):
    return [model.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def test_left_pad_puts_real_tokens_flush_right() -> None:
    tokens, mask = left_pad([[5, 6, 7], [8]], pad_id=0, device="cpu")
    assert tokens.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def _tl_greedy(model, prompt: list[int], n: int) -> list[int]:
    """TransformerLens' own generate on one prompt: the tokens after it (an end token and the
    padding after it included)."""
    out = model.generate(
        torch.tensor([prompt]),
        max_new_tokens=n,
        do_sample=False,
        stop_at_eos=True,
        eos_token_id=stop_token_ids(model),
        verbose=False,
        return_type="tokens",
    )
    return out[0, len(prompt) :].tolist()


def test_greedy_batch_equals_transformerlens_generate_one_by_one(tiny_model) -> None:
    settings = GenerationSettings(max_new_tokens=12, do_sample=False)
    ids = _ids(tiny_model, TEXTS)
    batched = generate_batch(tiny_model, ids, settings, seeds=[0] * len(ids))
    stops = set(stop_token_ids(tiny_model))
    for prompt, got in zip(ids, batched, strict=True):
        ref = _tl_greedy(tiny_model, prompt, 12)
        cut = next((i for i, t in enumerate(ref) if t in stops), len(ref))
        assert got.response_ids == ref[:cut]
        assert got.stopped == (cut < len(ref))


def test_sampling_depends_only_on_the_example_seed(tiny_model) -> None:
    settings = GenerationSettings(max_new_tokens=10, do_sample=True, temperature=1.0)
    ids = _ids(tiny_model, TEXTS)
    together = generate_batch(tiny_model, ids, settings, seeds=[11, 12, 13, 14])
    alone = [
        generate_batch(tiny_model, [p], settings, seeds=[s])[0]
        for p, s in zip(ids, [11, 12, 13, 14], strict=True)
    ]
    assert [g.response_ids for g in together] == [g.response_ids for g in alone]
    reordered = generate_batch(tiny_model, ids[::-1], settings, seeds=[14, 13, 12, 11])
    assert [g.response_ids for g in reordered[::-1]] == [g.response_ids for g in together]


@pytest.mark.parametrize(
    ("top_p", "expected"),
    [(1.0, [0.5, 0.3, 0.2, 0.0, 0.0]), (0.75, [0.625, 0.375, 0.0, 0.0, 0.0])],
)
def test_sampling_draws_from_the_tempered_nucleus_distribution(top_p, expected) -> None:
    """20,000 rows, one generator each: frequencies within 5 standard errors of the expected
    probabilities, and tokens of probability 0 (or cut by top_p) never drawn."""
    n = 20_000
    logits = torch.tensor([[0.5, 0.3, 0.2, 0.0, 0.0]]).log().expand(n, -1)
    settings = GenerationSettings(max_new_tokens=1, do_sample=True, temperature=1.0, top_p=top_p)
    draws = sample(logits, settings, [torch.Generator().manual_seed(i) for i in range(n)])
    freq = torch.bincount(draws, minlength=5).double() / n
    p = torch.tensor(expected, dtype=torch.float64)
    assert torch.all(freq[p == 0] == 0)
    assert torch.all((freq - p).abs() <= 5 * (p * (1 - p) / n).sqrt() + 1e-12), freq.tolist()


def test_different_seeds_give_different_samples(tiny_model) -> None:
    settings = GenerationSettings(max_new_tokens=10, do_sample=True, temperature=2.0)
    prompt = _ids(tiny_model, TEXTS[:1])
    outs = {
        tuple(generate_batch(tiny_model, prompt, settings, seeds=[s])[0].response_ids)
        for s in range(5)
    }
    assert len(outs) > 1


def test_stop_tokens_end_a_row_and_are_not_part_of_the_response(tiny_model) -> None:
    settings = GenerationSettings(max_new_tokens=30, do_sample=True, temperature=3.0)
    stops = set(stop_token_ids(tiny_model))
    gens = generate_batch(tiny_model, _ids(tiny_model, TEXTS) * 4, settings, seeds=range(16))
    for g in gens:
        assert not stops & set(g.response_ids)
        assert g.stopped or len(g.response_ids) == 30


def test_activations_captured_while_generating_equal_a_teacher_forced_pass(tiny_model) -> None:
    layers = list(range(tiny_model.cfg.n_layers))
    names = [hook_name("resid_post", layer) for layer in layers]
    settings = GenerationSettings(max_new_tokens=8, do_sample=True, temperature=2.0)
    ids = _ids(tiny_model, TEXTS) * 2
    gens = generate_batch(tiny_model, ids, settings, seeds=range(8), capture=names)
    kept = [i for i, g in enumerate(gens) if g.response_ids]
    assert any(len(gens[i].response_ids) == 8 for i in kept)  # the extra last-token pass ran
    teacher = pooled_activations(
        tiny_model, [ids[i] for i in kept], [gens[i].response_ids for i in kept], layers
    )
    for row, i in enumerate(kept):
        torch.testing.assert_close(gens[i].pooled, teacher[row], rtol=1e-4, atol=1e-4)
    # capture must not change what is generated
    plain = generate_batch(tiny_model, ids, settings, seeds=range(8))
    assert [g.response_ids for g in plain] == [g.response_ids for g in gens]


def test_chat_prompts_share_their_template_prefix_and_generate_as_one_by_one(tiny_model) -> None:
    """Chat prompts start with the same template tokens, computed once per batch: greedy output
    equals TransformerLens' generate on each prompt alone, sampled output equals each prompt
    generated alone (a batch of one shares nothing)."""
    ids = chat_ids(tiny_model, TEXTS) * 2
    _, shared = prefix_cache(tiny_model, ids, min(map(len, ids)) - 1, share=True)
    assert shared >= MIN_SHARED_PREFIX
    greedy = GenerationSettings(max_new_tokens=10, do_sample=False)
    batched = generate_batch(tiny_model, ids, greedy, seeds=[0] * len(ids))
    for prompt, got in zip(ids, batched, strict=True):
        ref = _tl_greedy(tiny_model, prompt, 10)
        assert got.response_ids == ref[: len(got.response_ids)]
        assert len(got.response_ids) == 10 or ref[len(got.response_ids)] in stop_token_ids(
            tiny_model
        )
    hot = GenerationSettings(max_new_tokens=10, do_sample=True, temperature=2.0)
    together = generate_batch(tiny_model, ids, hot, seeds=range(len(ids)))
    alone = [generate_batch(tiny_model, [p], hot, seeds=[s])[0] for s, p in enumerate(ids)]
    assert [g.response_ids for g in together] == [g.response_ids for g in alone]


def test_generation_and_teacher_forced_pass_share_the_prefix_unless_hooked(
    tiny_model, monkeypatch
) -> None:
    import tlextract.ops.generate
    import tlextract.ops.pool

    shared: list[int] = []

    def spy(*args, **kwargs):
        cache, n = prefix_cache(*args, **kwargs)
        shared.append(n)
        return cache, n

    monkeypatch.setattr(tlextract.ops.generate, "prefix_cache", spy)
    monkeypatch.setattr(tlextract.ops.pool, "prefix_cache", spy)
    ids = chat_ids(tiny_model, TEXTS)
    greedy = GenerationSettings(max_new_tokens=3, do_sample=False)
    gens = generate_batch(tiny_model, ids, greedy, seeds=[0] * len(ids))
    pooled_activations(tiny_model, ids, [g.response_ids or [5] for g in gens], [0])
    assert len(shared) == 2 and min(shared) >= MIN_SHARED_PREFIX
    with tiny_model.hooks(fwd_hooks=[("blocks.0.hook_resid_post", lambda act, hook: None)]):
        generate_batch(tiny_model, ids, greedy, seeds=[0] * len(ids))
    assert shared[2] == 0  # a user's hook may depend on rows or positions


def test_activations_with_a_shared_prefix_equal_each_example_run_alone(tiny_model) -> None:
    """Captured while generating and from the batched teacher-forced pass (both computing the
    template prefix once) against run_with_cache on each unpadded example by itself."""
    layers = list(range(tiny_model.cfg.n_layers))
    names = [hook_name("resid_post", layer) for layer in layers]
    ids = chat_ids(tiny_model, TEXTS)
    settings = GenerationSettings(max_new_tokens=6, do_sample=True, temperature=2.0)
    gens = generate_batch(tiny_model, ids, settings, seeds=range(len(ids)), capture=names)
    kept = [i for i, g in enumerate(gens) if g.response_ids]
    assert len(kept) >= 2
    teacher = pooled_activations(
        tiny_model, [ids[i] for i in kept], [gens[i].response_ids for i in kept], layers
    )
    for row, i in enumerate(kept):
        full = torch.tensor([ids[i] + gens[i].response_ids])
        _, cache = tiny_model.run_with_cache(full, names_filter=names, return_type=None)
        alone = torch.stack([cache[n][0, len(ids[i]) :].mean(0) for n in names])
        torch.testing.assert_close(gens[i].pooled, alone, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(teacher[row], alone, rtol=1e-4, atol=1e-4)
