"""The in-memory call against the pipeline and against fresh teacher-forced passes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import NATURAL

from tlextract import extract, monitor, steer
from tlextract.config import load_experiment
from tlextract.errors import TLExtractError
from tlextract.model.tokens import tokenize
from tlextract.ops.bootstrap import Interval
from tlextract.ops.trait_vectors import TraitVectors
from tlextract.settings import settings_for
from tlextract.stages.extract import Extraction
from tlextract.stages.run import run_trait
from tlextract.store import derive_seed
from tlextract.traits import render_prompt

N = 6


def _pipeline_args(experiments: Path, mode: str):
    exp = load_experiment("tiny", experiments)
    run = settings_for(exp, "alpha", variant="natural", n_examples=N, mode=mode)
    seeds = [derive_seed(exp.seed, "alpha", pol, i) for pol in ("pos", "neg") for i in range(N)]
    return exp, run, seeds


@pytest.mark.parametrize("mode", ["two-stage", "combined"])
def test_extract_equals_the_pipeline_on_the_same_prompts(experiments, tiny_model, mode) -> None:
    exp, run, seeds = _pipeline_args(experiments, mode)
    expected = run_trait(run, get_model=lambda: tiny_model)
    assert expected is not None
    before = sorted(p.name for p in experiments.rglob("*"))
    got = extract(
        tiny_model, NATURAL["pos"][:N], NATURAL["neg"][:N], mode=mode, seeds=seeds,
        generation=exp.generation, style=exp.prompt_style, batch_size=4,
    )  # fmt: skip
    assert sorted(p.name for p in experiments.rglob("*")) == before  # wrote nothing
    assert got.layers == expected.layers and got.hook == expected.hook
    assert got.metadata["n_pos"] == expected.metadata["n_pos"]
    assert torch.allclose(got.vectors, expected.vectors, atol=1e-5)


def _fresh_mean(model, prompt_ids: list[int], response_ids: list[int]) -> torch.Tensor:
    """One example alone, no batching or padding: mean residual over its response tokens."""
    tokens = torch.tensor([prompt_ids + response_ids])
    _, cache = model.run_with_cache(tokens)
    rows = [cache[f"blocks.{b}.hook_resid_post"][0, len(prompt_ids) :] for b in range(3)]
    return torch.stack([r.mean(0) for r in rows])


def test_pairs_pool_like_a_fresh_teacher_forced_pass(tiny_model) -> None:
    pos = [("Tell me a fact.", "Water boils at one hundred degrees."), ("Why?", "Because.")]
    neg = [("Tell me a story.", "Once upon a time a dragon slept."), ("Go on.", "It woke up.")]
    got = extract(tiny_model, pos, neg, batch_size=2)
    tok = tiny_model.tokenizer

    def side(pairs):
        prompts = tokenize(tiny_model, [render_prompt(tok, "chat", "", p) for p, _ in pairs],
                           "chat")  # fmt: skip
        return torch.stack([
            _fresh_mean(tiny_model, ids, tok(r, add_special_tokens=False)["input_ids"])
            for ids, (_, r) in zip(prompts, pairs, strict=True)
        ])  # fmt: skip

    assert torch.allclose(got.pos, side(pos), atol=1e-4)
    assert torch.allclose(got.vectors, side(pos).mean(0) - side(neg).mean(0), atol=1e-4)
    assert got.responses["pos"][0] == "Water boils at one hundred degrees."


def test_prompt_last_reads_the_last_prompt_token_without_generating(tiny_model) -> None:
    got = extract(tiny_model, ["Be precise."], ["Be vague."], pooling="prompt_last")
    ids = tokenize(tiny_model, [render_prompt(tiny_model.tokenizer, "chat", "", "Be precise.")],
                   "chat")[0]  # fmt: skip
    _, cache = tiny_model.run_with_cache(torch.tensor([ids]))
    last = torch.stack([cache[f"blocks.{b}.hook_resid_post"][0, -1] for b in range(3)])
    assert torch.allclose(got.pos[0], last, atol=1e-4)
    assert got.responses == {"pos": [], "neg": []}


def test_prompt_last_on_pairs_reads_the_last_token_of_prompt_and_answer(tiny_model) -> None:
    # Shared prompts, different answers: the contrast is in the answers, so it must be read.
    pos = [("Describe the sea.", "It is vast and calm."), ("Describe a cat.", "Soft and warm.")]
    neg = [("Describe the sea.", "Wet."), ("Describe a cat.", "An animal.")]
    got = extract(tiny_model, pos, neg, pooling="prompt_last", batch_size=2)
    tok = tiny_model.tokenizer

    def last_tokens(pairs):
        prompts = tokenize(tiny_model, [render_prompt(tok, "chat", "", p) for p, _ in pairs],
                           "chat")  # fmt: skip
        rows = []
        for ids, (_, answer) in zip(prompts, pairs, strict=True):
            full = ids + tok(answer, add_special_tokens=False)["input_ids"]
            _, cache = tiny_model.run_with_cache(torch.tensor([full]))
            rows.append(torch.stack([cache[f"blocks.{b}.hook_resid_post"][0, -1]
                                     for b in range(3)]))  # fmt: skip
        return torch.stack(rows)

    assert torch.allclose(got.pos, last_tokens(pos), atol=1e-4)
    assert torch.allclose(got.neg, last_tokens(neg), atol=1e-4)
    assert got.vectors.norm(dim=-1).min() > 0


def test_sides_that_read_the_same_tokens_are_refused_not_zero(tiny_model) -> None:
    same = [("Describe the sea.", "It is vast."), ("Describe a cat.", "Soft.")]
    with pytest.raises(TLExtractError, match="same mean, so every vector would be zero"):
        extract(tiny_model, same, list(same), pooling="prompt_last")
    with pytest.raises(TLExtractError, match="same mean"):  # prompts alone, shared
        extract(tiny_model, ["Be precise."], ["Be precise."], pooling="prompt_last")


def test_the_result_steers_monitors_evaluates_and_saves(tiny_model, tmp_path: Path) -> None:
    got = extract(tiny_model, NATURAL["pos"][:N], NATURAL["neg"][:N], save=tmp_path / "v.pt")
    assert isinstance(got, TraitVectors)
    with steer(tiny_model, got, 1, 0.5):
        pass
    watched = monitor(tiny_model, ["Hello"], [got], layer=1)
    assert len(watched.texts[0].scores["trait"]) == len(watched.texts[0].tokens)
    figures = got.evaluate(folds=3, n_boot=200)
    assert figures.layer in got.layers and isinstance(figures.auroc, Interval)
    saved = TraitVectors.load(tmp_path / "v.pt")
    assert torch.equal(saved.vectors, got.vectors) and isinstance(got, Extraction)


def test_bad_calls_get_one_clear_error(tiny_model) -> None:
    with pytest.raises(TLExtractError, match="all be prompts"):
        extract(tiny_model, ["a", ("b", "c")], ["d"])  # type: ignore[list-item]
    with pytest.raises(TLExtractError, match="layers \\[7\\] do not exist"):
        extract(tiny_model, ["a"], ["b"], layers=[7])
    with pytest.raises(TLExtractError, match="no positive examples"):
        extract(tiny_model, [], ["b"])
