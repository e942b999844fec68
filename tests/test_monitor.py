"""Per-token monitoring on the tiny model, checked against run_with_cache on the final text; the
pictures and the ``monitor`` command."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from tlextract.cli.main import main
from tlextract.config import GenerationSettings
from tlextract.errors import TLExtractError
from tlextract.model.tokens import tokenize
from tlextract.ops.generate import generate_batch
from tlextract.ops.monitor import monitor
from tlextract.ops.trait_vectors import TraitVectors
from tlextract.report.monitor_view import normalise, write_monitoring
from tlextract.traits import render_prompt

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [
    "Hi",
    "What is the capital of France? Please answer briefly and clearly, thanks.",
    "Tell me a story about a cat who lived in a lighthouse by the sea and loved fish.",
    "2+2?",
]
# Hot sampling on the tiny model: some answers hit an end token early, others run out of budget.
HOT = GenerationSettings(max_new_tokens=20, do_sample=True, temperature=3.0)


def _vectors(model, name: str, layers: tuple[int, ...], seed: int) -> TraitVectors:
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(len(layers), model.cfg.d_model, generator=g)
    return TraitVectors(name, "mean_diff", "tiny-random", "resid_post", layers, v)


@pytest.fixture
def traits(tiny_model) -> dict[str, TraitVectors]:
    # a and b are read at block 1 (one hook for both), c at block 2.
    return {
        "a": _vectors(tiny_model, "a", (0, 1, 2), 0),
        "b": _vectors(tiny_model, "b", (1,), 1),
        "c": _vectors(tiny_model, "c", (1, 2), 2),
    }


LAYERS = {"a": 1, "b": 1, "c": 2}


def test_scores_equal_run_with_cache_on_the_final_text(tiny_model, traits) -> None:
    prompts = PROMPTS * 8
    watched = monitor(
        tiny_model, prompts, traits, LAYERS, settings=HOT, seeds=range(32), batch_size=16
    )
    stopped = [t.stopped for t in watched.texts]
    assert any(stopped) and not all(stopped), "needs early-stopped and full-budget rows"
    assert watched.hook_names == {t: f"blocks.{LAYERS[t]}.hook_resid_post" for t in traits}
    names = sorted(set(watched.hook_names.values()))
    for text in watched.texts:
        _, cache = tiny_model.run_with_cache(
            torch.tensor([text.token_ids]), names_filter=names, return_type=None
        )
        for trait, tv in traits.items():
            v = tv[LAYERS[trait]]
            expected = cache[watched.hook_names[trait]][0] @ (v / v.norm())
            torch.testing.assert_close(
                torch.tensor(text.scores[trait]), expected, atol=1e-4, rtol=1e-4
            )


def test_every_token_has_one_score_per_trait_and_prompt_tokens_are_marked(
    tiny_model, traits
) -> None:
    watched = monitor(tiny_model, PROMPTS, traits, LAYERS, settings=HOT, seeds=range(4))
    ids = tokenize(
        tiny_model, [render_prompt(tiny_model.tokenizer, "chat", "", p) for p in PROMPTS], "chat"
    )
    for text, prompt_ids in zip(watched.texts, ids, strict=True):
        n = len(text.token_ids)
        assert len(text.tokens) == len(text.is_prompt) == n
        assert all(len(s) == n for s in text.scores.values())
        assert text.is_prompt == [True] * len(prompt_ids) + [False] * (n - len(prompt_ids))
        assert text.token_ids[: len(prompt_ids)] == prompt_ids
        # Tokens decode one by one (a character split across tokens shows as U+FFFD in each).
        n_prompt = len(prompt_ids)
        assert "".join(text.tokens[:n_prompt]) == tiny_model.tokenizer.decode(prompt_ids)


def test_answers_are_those_of_plain_generation_with_the_same_seeds(tiny_model, traits) -> None:
    watched = monitor(tiny_model, PROMPTS * 2, traits, settings=HOT, seeds=range(8))
    ids = tokenize(
        tiny_model,
        [render_prompt(tiny_model.tokenizer, "chat", "", p) for p in PROMPTS * 2],
        "chat",
    )
    plain = generate_batch(tiny_model, ids, HOT, seeds=range(8))
    for text, prompt_ids, g in zip(watched.texts, ids, plain, strict=True):
        assert text.token_ids[len(prompt_ids) :] == g.response_ids
        assert text.stopped == g.stopped
    assert watched.layers == {"a": 1, "b": 1, "c": 2}  # default: the middle of each trait's layers


def test_scores_do_not_depend_on_the_batch(tiny_model, traits) -> None:
    together = monitor(tiny_model, PROMPTS, traits, LAYERS, settings=HOT, batch_size=4)
    alone = monitor(tiny_model, PROMPTS, traits, LAYERS, settings=HOT, batch_size=1)
    for x, y in zip(together.texts, alone.texts, strict=True):
        assert x.token_ids == y.token_ids
        for trait in traits:
            torch.testing.assert_close(
                torch.tensor(x.scores[trait]), torch.tensor(y.scores[trait]), atol=1e-4, rtol=1e-4
            )


def test_streamed_tokens_come_while_generating_and_equal_the_returned_texts(
    tiny_model, traits
) -> None:
    prompts = PROMPTS * 8  # with these seeds, early stops and full budgets in every batch
    passes = 0  # the model's forward passes so far, counted outside TransformerLens' hooks

    def count(*_: object) -> None:
        nonlocal passes
        passes += 1

    streamed: dict[int, list[tuple[int, dict[str, float], int]]] = {}
    handle = tiny_model.embed.register_forward_hook(count)
    try:
        watched = monitor(tiny_model, prompts, traits, LAYERS, settings=HOT, seeds=range(32),
                          batch_size=12,
                          on_token=lambda i, t, s: streamed.setdefault(i, []).append(
                              (t, s, passes)))  # fmt: skip
    finally:
        handle.remove()
    stopped = [t.stopped for t in watched.texts]
    assert any(stopped) and not all(stopped), "needs early-stopped and full-budget rows"
    for i, text in enumerate(watched.texts):
        answer = [k for k, p in enumerate(text.is_prompt) if not p]
        got = streamed.get(i, [])
        assert [t for t, _, _ in got] == [text.token_ids[k] for k in answer]
        assert [s for _, s, _ in got] == [{t: text.scores[t][k] for t in traits} for k in answer]
    # Answer token k is handed out right after decode step k + 1 reads it, not at the end: in
    # each batch, after its pass k + 2 (the prompt pass, then k + 1 steps).
    for first in range(0, len(prompts), 12):
        rows = [streamed[i] for i in range(first, first + 12) if i in streamed]
        start = min(row[0][2] for row in rows)
        assert first > 0 or start == 2
        for row in rows:
            assert [p for *_, p in row] == list(range(start, start + len(row)))


def test_bad_inputs_are_named(tiny_model, traits) -> None:
    foreign = TraitVectors("f", "mean_diff", "other", "resid_post", (1,), torch.ones(1, 7))
    cases = [
        (lambda: monitor(tiny_model, [], traits), "at least one prompt"),
        (lambda: monitor(tiny_model, PROMPTS, traits, {"a": 1, "zzz": 1}), "unknown trait"),
        (lambda: monitor(tiny_model, PROMPTS, traits, 7), "layer 7 does not exist"),
        (lambda: monitor(tiny_model, PROMPTS, traits, 0), "have no layer 0"),
        (lambda: monitor(tiny_model, PROMPTS, [foreign], 1), "d_model"),
        (lambda: monitor(tiny_model, PROMPTS, [traits["a"], traits["a"]]), "distinct"),
    ]
    for call, message in cases:
        with pytest.raises(TLExtractError, match=message):
            call()


def test_colour_scale_puts_the_poles_at_plus_and_minus_one(tiny_model, traits) -> None:
    text = monitor(tiny_model, PROMPTS[:1], traits, LAYERS, settings=HOT).texts[0]
    raw = text.scores["a"]
    values, label = normalise(text, "a", {"pos": raw[-1], "neg": raw[-1] - 2.0})
    assert values[-1] == pytest.approx(1.0) and "pos mean" in label
    values, label = normalise(text, "a", None)
    answer = torch.tensor([v for v, p in zip(values, text.is_prompt, strict=True) if not p])
    assert float(answer.mean()) == pytest.approx(0.0, abs=1e-6) and "z-score" in label


def test_written_json_picture_and_page_line_up(tiny_model, traits, tmp_path: Path) -> None:
    watched = monitor(tiny_model, ["Is 1 < 2 & <b>bold</b>?", "Hi"], traits, LAYERS, settings=HOT)
    paths = write_monitoring(watched, tmp_path, "c", poles={"c": {"pos": 1.0, "neg": -1.0}})
    assert [p.name for p in paths] == ["monitor.json", "heatmap_0.png", "heatmap_1.png", "c.html"]
    saved = json.loads(paths[0].read_text())
    for text in saved["texts"]:
        assert {len(text["tokens"]), len(text["is_prompt"]), len(text["token_ids"])} == {
            len(text["scores"]["c"])
        }
    page = paths[-1].read_text()
    assert len(re.findall(r"<span class=", page)) == sum(len(t.tokens) for t in watched.texts)
    assert "<b>bold</b>" not in page and "&lt;b&gt;bold&lt;/b&gt;" in page


def test_cli_monitor_writes_json_heatmaps_and_page(experiments: Path, capsys) -> None:
    base = ["--experiment", "tiny", "--experiments-dir", str(experiments)]
    assert main(["run", *base, "--n-examples", "4"]) == 0
    code = main(
        [
            "monitor",
            *base,
            "--prompt",
            "Hello there",
            "--prompt",
            "Why?",
            "--max-new-tokens",
            "5",
            "--color-trait",
            "beta",
        ]
    )
    assert code == 0
    out = experiments / "tiny" / "monitor"
    saved = json.loads((out / "monitor.json").read_text())
    assert saved["traits"] == ["alpha", "beta"] and len(saved["texts"]) == 2
    assert set(saved["poles"]) == {"alpha", "beta"}
    assert (out / "heatmap_1.png").exists() and (out / "beta.html").exists()
    assert "middle of the vectors' layers" in capsys.readouterr().out
    assert main(["monitor", *base, "--prompt", "x", "--color-trait", "nope"]) == 2
