"""steer --auto on planted data: a direction that, by construction, makes the tiny model write
certain letters, and a classifier that counts them."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from conftest import write_experiment

from tlextract import load_model
from tlextract.cli.main import main
from tlextract.config import load_experiment
from tlextract.ops.bootstrap import Interval
from tlextract.ops.fluency import kl_divergence, neutral_answers
from tlextract.ops.pool import pack
from tlextract.ops.steer import residual_norm
from tlextract.ops.trait_vectors import TraitVectors
from tlextract.settings import settings_for, steer_dir
from tlextract.steering.autosteer import auto_steer, default_layers
from tlextract.steering.effects import side_effect_table, wrong_way_share

POS_LETTERS = set("aeiou")


class LetterShare:
    """Planted classifier: the share of an answer's letters that are lower-case vowels."""

    def prob_pos(self, texts: Sequence[str]) -> list[float]:
        out = []
        for t in texts:
            letters = [c for c in t if c.isalpha()]
            out.append(sum(c in POS_LETTERS for c in letters) / len(letters) if letters else 0.0)
        return out


@pytest.fixture(scope="module")
def sharp_model():
    """The tiny random model with its unembedding scaled up: its logits are nearly flat as
    initialised, so nothing added to the residual could change what it writes."""
    model = load_model("tiny-random")
    with torch.no_grad():
        model.W_U.mul_(20.0)
    return model


@pytest.fixture
def planted(tmp_path: Path, sharp_model):
    """A run of the tiny experiment and a 'vowel' vector at the last block: the unembedding
    direction of the vowels minus that of the other letters."""
    tiny_model = sharp_model
    write_experiment(tmp_path, generation={"max_new_tokens": 12, "temperature": 1.0})
    run = settings_for(load_experiment("tiny", tmp_path), "alpha", n_examples=4)
    tok = tiny_model.tokenizer
    ids = {c: tok.convert_tokens_to_ids(c) for c in "abcdefghijklmnopqrstuvwxyz"}
    w_u = tiny_model.W_U.detach()
    vowels = w_u[:, [i for c, i in ids.items() if c in POS_LETTERS]].mean(1)
    others = w_u[:, [i for c, i in ids.items() if c not in POS_LETTERS]].mean(1)
    last = tiny_model.cfg.n_layers - 1
    vector = torch.zeros(tiny_model.cfg.n_layers, tiny_model.cfg.d_model)
    vector[last] = vowels - others
    vectors = TraitVectors(
        "alpha", "mean_diff", "tiny-random", "resid_post",
        tuple(range(tiny_model.cfg.n_layers)), vector,
    )  # fmt: skip
    return run, vectors, last


def _kl(model, vectors: TraitVectors, layer: int, alpha: float) -> float:
    """KL(steered || unsteered) on the neutral answers, recomputed with a plain hook."""
    prompts, answers = neutral_answers(model, "chat")
    tokens, attn, answer = pack(prompts, answers, model.tokenizer.pad_token_id, "cpu")
    delta = alpha * residual_norm(model, layer) * vectors[layer] / vectors[layer].norm()
    with torch.inference_mode():
        base = model(tokens, attention_mask=attn)[:, :-1][answer[:, 1:]].log_softmax(-1)
        hook = (f"blocks.{layer}.hook_resid_post", lambda x, hook: x + delta)
        with model.hooks(fwd_hooks=[hook]):
            steered = model(tokens, attention_mask=attn)[:, :-1][answer[:, 1:]].log_softmax(-1)
    return float(kl_divergence(steered, base).mean())


def test_planted_vector_moves_the_classifier_and_a_random_direction_does_not(
    planted, sharp_model
) -> None:
    run, vectors, last = planted
    result = auto_steer(
        sharp_model, run, vectors, "pos", layers=[last], alphas=(0.5, 1.0, 2.0),
        max_kl=100.0, max_logprob_drop=100.0, n_questions=6, classifier=LetterShare(),
    )  # fmt: skip
    assert result.chosen is not None and result.chosen.layer == last
    report = {r.name: r for r in result.report}
    steered, random = report["steered"].shift, report["random direction"].shift
    assert steered is not None and random is not None
    assert steered.low > 0  # the planted vector raises the vowel share, interval above zero
    assert steered.value > random.value + 0.1
    assert set(result.selection_questions).isdisjoint(result.report_questions)
    # The answers really are the model's: the unsteered ones match a plain generation's count.
    assert len(report["unsteered"].answers) == len(result.report_questions)


def test_auto_never_returns_an_alpha_over_the_kl_bound(planted, sharp_model) -> None:
    tiny_model = sharp_model
    run, vectors, last = planted
    alphas = (0.25, 0.5, 1.0, 1.5, 2.0)
    kls = [_kl(tiny_model, vectors, last, a) for a in alphas]
    assert kls == sorted(kls) and kls[0] > 0
    for bound in (kls[1] * 1.01, kls[3] * 1.01):
        result = auto_steer(
            tiny_model, run, vectors, "pos", layers=[last], alphas=alphas, max_kl=bound,
            max_logprob_drop=100.0, n_questions=4, classifier=LetterShare(),
        )  # fmt: skip
        assert result.chosen is not None
        assert _kl(tiny_model, vectors, last, result.chosen.alpha) <= bound
        assert all(c.kl <= bound for c in result.candidates if c.passed)
        # The first alpha over the bound is measured, refused, and nothing stronger is tried.
        refused = [c for c in result.candidates if not c.passed]
        assert len(refused) == 1 and refused[0].kl > bound
        assert refused[0].kl == pytest.approx(_kl(tiny_model, vectors, last, refused[0].alpha),
                                              rel=1e-4)  # fmt: skip


def test_auto_with_a_bound_nothing_meets_chooses_nothing(planted, sharp_model) -> None:
    run, vectors, last = planted
    result = auto_steer(
        sharp_model, run, vectors, "neg", layers=[last], alphas=(1.0,), max_kl=1e-9,
        n_questions=2, classifier=LetterShare(),
    )  # fmt: skip
    assert result.chosen is None and result.report == []
    assert result.candidates[0].alpha == -1.0 and not result.candidates[0].passed


def test_default_layers_spread_over_the_middle_and_include_the_preferred(planted) -> None:
    _, vectors, _ = planted
    wide = TraitVectors("t", "mean_diff", "m", "resid_post", tuple(range(30)), torch.ones(30, 4))
    assert default_layers(wide, None) == [4, 9, 14, 20, 25]
    assert 27 in default_layers(wide, 27)
    assert default_layers(vectors, 1) == [0, 1, 2]


def test_cli_steer_auto_writes_its_choice(tmp_path: Path, capsys) -> None:
    write_experiment(tmp_path)
    base = ["--experiment", "tiny", "--experiments-dir", str(tmp_path), "--traits", "alpha"]
    assert main(["run", *base]) == 0
    args = ["steer", *base, "--auto", "--n-questions", "2", "--alphas=0.5,1", "--max-kl", "50",
            "--max-logprob-drop", "50"]  # fmt: skip
    assert main(args) == 0
    out = steer_dir(settings_for(load_experiment("tiny", tmp_path), "alpha"))
    saved = json.loads((out / "auto.json").read_text())
    assert saved["max_kl"] == 50 and [abs(c["alpha"]) for c in saved["candidates"]][:2] == [0.5, 1]
    assert saved["classifier"].startswith("bag of words on")
    printed = capsys.readouterr().out
    assert "steer --auto toward pos: layer" in printed
    assert (out / "auto.md").exists() and (out / "auto.png").stat().st_size > 0


# --- who a setting fails, and what else it moves -----------------------------------------------


class ConsonantHalf:
    """Planted classifier of a behaviour the vowel vector leaves alone: the share of an answer's
    consonants from the first half of the alphabet (b-m). The vector is vowels minus the mean of
    all consonants, so it favours no half of them (0.5 for an answer with no consonant)."""

    def prob_pos(self, texts: Sequence[str]) -> list[float]:
        out = []
        for t in texts:
            cons = [c for c in t.lower() if c.isalpha() and c.isascii() and c not in POS_LETTERS]
            out.append(sum(c <= "m" for c in cons) / len(cons) if cons else 0.5)
        return out


def test_a_vector_moving_half_the_questions_each_way_reports_half_wrong_way() -> None:
    g = torch.Generator().manual_seed(0)
    base = (0.3 + 0.4 * torch.rand(400, generator=g)).tolist()
    moves = [0.2 if i % 2 else -0.2 for i in range(400)]  # planted: half up, half down
    noise = (0.01 * torch.randn(400, generator=g)).tolist()
    steered = [b + m + e for b, m, e in zip(base, moves, noise, strict=True)]
    share = wrong_way_share(base, steered)
    assert share.value == pytest.approx(0.5, abs=1e-9)
    assert share.low < 0.5 < share.high and share.high - share.low < 0.15
    all_up = wrong_way_share(base, [b + 0.2 for b in base])
    assert all_up.value == 0.0 and all_up.high == 0.0
    assert wrong_way_share([0.5, 0.5], [0.5, 0.5]).value == 0.0  # unchanged is not wrong way


def test_side_effect_table_bolds_only_intervals_that_exclude_zero() -> None:
    rows = {"a": {"a": Interval(0.3, 0.1, 0.5), "b": Interval(0.02, -0.1, 0.12)}}
    table = side_effect_table(rows)
    assert table[0] == "| steered \\ classifier | a | b |"
    assert table[2] == "| a | **+0.30 [+0.10, +0.50]** | +0.02 [-0.10, +0.12] |"


def test_planted_vector_moves_its_trait_only_and_few_questions_the_wrong_way(
    planted, sharp_model
) -> None:
    run, vectors, last = planted
    others = {"vowels": LetterShare(), "consonants": ConsonantHalf()}
    result = auto_steer(
        sharp_model, run, vectors, "pos", layers=[last], alphas=(1.0, 2.0),
        max_kl=100.0, max_logprob_drop=100.0, n_questions=8, classifier=LetterShare(),
        others=others,
    )  # fmt: skip
    report = {r.name: r for r in result.report}
    assert report["unsteered"].effects is None
    steered, random = report["steered"].effects, report["random direction"].effects
    assert steered is not None and random is not None
    # The side effect on the planted trait equals the main shift (same classifier, same pairs).
    shift = report["steered"].shift
    assert shift is not None and steered.side_effects["vowels"].value == pytest.approx(shift.value)
    assert steered.side_effects["vowels"].low > 0
    assert steered.side_effects["consonants"].covers(0.0)
    assert steered.wrong_way.high < 0.5  # every question moved toward the vowels, none away
    assert random.side_effects["vowels"].value < steered.side_effects["vowels"].value - 0.3
    # Steering at this strength costs fluency on neutral questions too.
    assert steered.neutral_logprob_drop is not None and steered.neutral_logprob_drop.value > 0


class AlternatingPole:
    """Planted trait whose pole flips between questions: the vowel share for the answers to
    even-numbered questions, the consonant share for odd ones. The vowel vector then moves
    half the questions toward this trait's pole and half away from it."""

    def prob_pos(self, texts: Sequence[str]) -> list[float]:
        shares = LetterShare().prob_pos(texts)
        return [s if i % 2 == 0 else 1.0 - s for i, s in enumerate(shares)]


def test_a_planted_vector_moving_half_the_questions_each_way_reports_half_wrong_way(
    planted, sharp_model
) -> None:
    run, vectors, last = planted
    result = auto_steer(
        sharp_model, run, vectors, "pos", layers=[last], alphas=(2.0,), max_kl=100.0,
        max_logprob_drop=100.0, n_questions=8, classifier=AlternatingPole(),
        others={"alternating": AlternatingPole()},
    )  # fmt: skip
    steered = {r.name: r for r in result.report}["steered"].effects
    assert steered is not None
    assert steered.wrong_way.value == pytest.approx(0.5, abs=0.13)
    assert steered.wrong_way.low < 0.5 < steered.wrong_way.high
