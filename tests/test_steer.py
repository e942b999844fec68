"""Steering and ablation hooks on the tiny model, checked against unhooked runs; the alpha sweep
and the ``steer`` command end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import MIXED_LENGTH_TEXTS

from tlextract.cli.main import main
from tlextract.config import GenerationSettings, load_experiment
from tlextract.errors import TLExtractError
from tlextract.judge.base import Score
from tlextract.model.tokens import tokenize
from tlextract.ops.generate import generate_batch
from tlextract.ops.monitor import monitor
from tlextract.ops.steer import REFERENCE_TEXTS, ablate, residual_norm, steer
from tlextract.ops.trait_vectors import TraitVectors
from tlextract.report.sweep_view import write_sweep
from tlextract.settings import settings_for
from tlextract.stages.run import run_trait
from tlextract.steering.sweep import alpha_sweep, held_out_questions, reread
from tlextract.traits import render_prompt

pytestmark = pytest.mark.usefixtures("one_thread")
TEXTS = MIXED_LENGTH_TEXTS

LAYER = 1


def _ids(model, texts=TEXTS):
    return [model.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def _direction(model, seed: int = 0) -> torch.Tensor:
    return torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(seed))


def _resid(model, tokens, name):
    _, cache = model.run_with_cache(tokens, names_filter=name, return_type=None)
    return cache[name][0]


@pytest.mark.parametrize("do_sample", [False, True])
def test_alpha_zero_leaves_outputs_token_identical(tiny_model, do_sample: bool) -> None:
    settings = GenerationSettings(max_new_tokens=12, do_sample=do_sample, temperature=1.5)
    ids = _ids(tiny_model)
    plain = generate_batch(tiny_model, ids, settings, seeds=range(4))
    tokens = torch.tensor([ids[1]])
    with steer(tiny_model, _direction(tiny_model), LAYER, 0.0):
        steered = generate_batch(tiny_model, ids, settings, seeds=range(4))
        logits = tiny_model(tokens)
    assert [g.response_ids for g in steered] == [g.response_ids for g in plain]
    assert torch.equal(logits, tiny_model(tokens))


@pytest.mark.parametrize("positions", ["all", "prompt", "response"])
def test_steering_a_batch_equals_steering_each_prompt_alone(tiny_model, positions) -> None:
    settings = GenerationSettings(max_new_tokens=10, do_sample=True, temperature=1.0)
    ids, seeds = _ids(tiny_model), [11, 12, 13, 14]
    with steer(tiny_model, _direction(tiny_model), LAYER, 2.0, positions) as info:
        together = generate_batch(tiny_model, ids, settings, seeds)
        alone = [
            generate_batch(tiny_model, [p], settings, [s])[0]
            for p, s in zip(ids, seeds, strict=True)
        ]
    assert [g.response_ids for g in together] == [g.response_ids for g in alone]
    plain = generate_batch(tiny_model, ids, settings, seeds)
    assert [g.response_ids for g in plain] != [g.response_ids for g in together], (
        f"steering by {info.alpha} x {info.scale:.2f} changed nothing: the test would be vacuous"
    )


def test_steering_adds_alpha_times_scale_times_the_unit_vector(tiny_model) -> None:
    v = _direction(tiny_model)
    u = v / v.norm()
    name = f"blocks.{LAYER}.hook_resid_post"
    tokens = torch.tensor([_ids(tiny_model)[2]])
    before = _resid(tiny_model, tokens, name)
    with steer(tiny_model, v * 7.0, LAYER, 0.5) as info:  # the vector's length does not matter
        after = _resid(tiny_model, tokens, name)
        later = tiny_model(tokens)
    assert info.scale == pytest.approx(residual_norm(tiny_model, LAYER))
    torch.testing.assert_close(after - before, (0.5 * info.scale * u).expand_as(before))
    assert not torch.allclose(later, tiny_model(tokens)), "the next blocks must see the change"


def test_nested_interventions_add_up_and_leave_in_order(tiny_model) -> None:
    v, w = _direction(tiny_model, 0), _direction(tiny_model, 1)
    name = f"blocks.{LAYER}.hook_resid_post"
    tokens = torch.tensor([_ids(tiny_model)[1]])
    before = _resid(tiny_model, tokens, name)
    with steer(tiny_model, v, LAYER, 1.0, scale=1.0):
        with steer(tiny_model, w, LAYER, 1.0, scale=1.0):
            both = _resid(tiny_model, tokens, name)
        outer = _resid(tiny_model, tokens, name)
    torch.testing.assert_close(both - before, (v / v.norm() + w / w.norm()).expand_as(before))
    torch.testing.assert_close(outer - before, (v / v.norm()).expand_as(before))
    torch.testing.assert_close(_resid(tiny_model, tokens, name), before)


@pytest.mark.parametrize("positions", ["all", "prompt", "response"])
def test_planted_direction_shifts_the_monitored_projection_at_the_steered_tokens(
    tiny_model, positions
) -> None:
    """Generate under steering while monitoring the same hook: each token's score is the
    unsteered residual of the final text (teacher-forced) plus alpha * scale exactly where
    ``positions`` says, and nothing elsewhere."""
    v = _direction(tiny_model, 3)
    settings = GenerationSettings(max_new_tokens=8, do_sample=True, temperature=1.0)
    tv = TraitVectors("planted", "test", "tiny-random", "resid_post", (LAYER,), v[None])
    with steer(tiny_model, v, LAYER, 0.75, positions) as info:
        watched = monitor(tiny_model, TEXTS[:3], tv, settings=settings)
    u = v / v.norm()
    shift = 0.75 * info.scale
    for text in watched.texts:
        plain = _resid(tiny_model, torch.tensor([text.token_ids]), info.hook_name) @ u
        n_prompt = sum(text.is_prompt)
        expected = torch.zeros(len(text.token_ids))
        if positions in ("all", "prompt"):
            expected[:n_prompt] = shift
        if positions in ("all", "response"):
            expected[n_prompt - 1 :] = shift
        got = torch.tensor(text.scores["planted"]) - plain
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_ablation_removes_the_direction_and_nothing_else(tiny_model) -> None:
    v = _direction(tiny_model)
    u = v / v.norm()
    name = f"blocks.{LAYER}.hook_resid_post"
    tokens = torch.tensor([_ids(tiny_model)[2]])
    before = _resid(tiny_model, tokens, name)
    with ablate(tiny_model, v, LAYER) as info:
        after = _resid(tiny_model, tokens, name)
    assert info.kind == "ablate"
    torch.testing.assert_close(after @ u, torch.zeros(tokens.shape[1]), atol=1e-4, rtol=0)
    torch.testing.assert_close(after, before - (before @ u)[:, None] * u)


def test_residual_norm_is_the_median_token_norm_of_the_reference_texts(tiny_model) -> None:
    name = f"blocks.{LAYER}.hook_resid_post"
    norms = torch.cat(
        [
            _resid(tiny_model, torch.tensor([ids]), name).norm(dim=-1)
            for ids in _ids(tiny_model, REFERENCE_TEXTS)
        ]
    )
    assert residual_norm(tiny_model, LAYER) == pytest.approx(float(norms.median()), rel=1e-5)


def test_bad_inputs_are_named(tiny_model) -> None:
    v = _direction(tiny_model)
    tv = TraitVectors("t", "mean_diff", "tiny-random", "resid_post", (0,), v[None])
    cases = [
        (lambda: steer(tiny_model, v, 99, 1.0), "layer 99 does not exist"),
        (lambda: steer(tiny_model, tv, LAYER, 1.0), "have no layer 1"),
        (lambda: steer(tiny_model, torch.ones(5), LAYER, 1.0), "d_model"),
        (lambda: ablate(tiny_model, torch.zeros_like(v), LAYER), "zero"),
    ]
    for make, message in cases:
        with pytest.raises(TLExtractError, match=message), make():
            pass


# --- the alpha sweep ---------------------------------------------------------------------------


class HalfMissingJudge:
    """Scores by answer length, and answers 'missing' for every other prompt."""

    name = "half-missing"

    def __init__(self) -> None:
        self.calls = 0

    def score(self, prompts: list[str]) -> list[Score]:
        out = []
        for p in prompts:
            self.calls += 1
            out.append(Score(None) if self.calls % 2 else Score(float(len(p) % 101)))
        return out


@pytest.fixture
def extracted(experiments: Path, tiny_model):
    run = settings_for(load_experiment("tiny", experiments), "alpha", n_examples=4)
    vectors = run_trait(run, get_model=lambda: tiny_model)
    assert vectors is not None
    return run, vectors


def test_held_out_questions_are_not_in_the_extraction(extracted) -> None:
    run, _ = extracted
    questions, source = held_out_questions(run, 3)
    assert len(questions) == 3 and "not in the extraction" in source
    assert not set(questions) & set(run.trait.questions[:4])  # n_examples=4 used the first four


def test_sweep_keeps_seeds_across_alphas_and_measures_each_answer(extracted, tiny_model) -> None:
    run, vectors = extracted
    judge = HalfMissingJudge()
    sweep = alpha_sweep(tiny_model, run, vectors, LAYER, [-1.0, 0.0, 1.0], 3, judge=judge)
    assert [(c.intervention, c.alpha) for c in sweep.conditions] == [
        ("steer", -1.0),
        ("steer", 0.0),
        ("steer", 1.0),
        ("ablate", 0.0),
    ]
    zero = [a for a in sweep.answers if a.intervention == "steer" and a.alpha == 0.0]
    # alpha 0 is the unsteered model: same answers as plain generation with the same seeds.
    prompt_ids = tokenize(
        tiny_model,
        [render_prompt(tiny_model.tokenizer, "chat", "", q) for q in sweep.questions],
        "chat",
    )
    plain = generate_batch(
        tiny_model, prompt_ids, run.experiment.generation, [a.seed for a in zero]
    )
    assert [a.n_tokens for a in zero] == [len(g.response_ids) for g in plain]
    filled = [i for i, g in enumerate(plain) if g.response_ids]
    proj, logprob = reread(
        tiny_model,
        [prompt_ids[i] for i in filled],
        [plain[i].response_ids for i in filled],
        sweep.hook_name,
        vectors[LAYER] / vectors[LAYER].norm(),
    )
    assert [zero[i].projection for i in filled] == pytest.approx(proj, abs=1e-5)
    assert [zero[i].logprob for i in filled] == pytest.approx(logprob, abs=1e-5)
    assert all(
        c.trait_missing
        == pytest.approx(
            sum(
                a.trait is None
                for a in sweep.answers
                if (a.intervention, a.alpha) == (c.intervention, c.alpha)
            )
            / 3
        )
        for c in sweep.conditions
    )
    assert 0 < sum(a.trait is None for a in sweep.answers) < len(sweep.answers)
    assert sweep.poles is not None and set(sweep.poles) == {"pos", "neg"}


def test_reread_logprob_matches_a_plain_forward_pass(tiny_model) -> None:
    prompt, answer = _ids(tiny_model, TEXTS[1:2])[0], _ids(tiny_model, [" Paris, I think."])[0]
    tokens = torch.tensor([prompt + answer])
    with torch.inference_mode():
        logp = tiny_model(tokens)[0].log_softmax(-1)
    expected = sum(float(logp[len(prompt) + k - 1, t]) for k, t in enumerate(answer)) / len(answer)
    u = _direction(tiny_model)
    u = u / u.norm()
    name = f"blocks.{LAYER}.hook_resid_post"
    proj, got = reread(tiny_model, [prompt, _ids(tiny_model)[0]], [answer, answer], name, u)
    assert got[0] == pytest.approx(expected, abs=1e-5)
    resid = _resid(tiny_model, tokens, name)[len(prompt) :] @ u
    assert proj[0] == pytest.approx(float(resid.mean()), abs=1e-5)


def test_write_sweep_writes_json_and_plot(extracted, tiny_model, tmp_path: Path) -> None:
    run, vectors = extracted
    sweep = alpha_sweep(tiny_model, run, vectors, LAYER, [0.0, 0.5], 2, ablation=False)
    data, table, png = write_sweep(sweep, tmp_path / "steer")
    saved = json.loads(data.read_text())
    assert saved["judge"] == "none" and saved["conditions"][0]["trait_missing"] is None
    assert len(saved["answers"]) == 4 and png.stat().st_size > 0
    assert table.read_text().count("| alpha ") == 2


def test_cli_steer_defaults_to_the_cross_validated_layer_of_the_report(
    experiments: Path, capsys
) -> None:
    base = ["--experiment", "tiny", "--experiments-dir", str(experiments), "--traits", "alpha"]
    assert main(["run", *base, "--n-examples", "8"]) == 0
    assert main(["report", *base, "--n-examples", "8", "--methods", "mean_diff"]) == 0
    out = experiments / "tiny" / "alpha" / "extraction"
    best = json.loads((out / "report" / "crossval.json").read_text())["layer"]["mean_diff"]
    assert main(["steer", *base, "--alphas=-1,0,1", "--n-questions", "2", "--no-ablate"]) == 0
    sweep = json.loads((out / "steer" / "sweep.json").read_text())
    assert sweep["layer"] == best and [c["alpha"] for c in sweep["conditions"]] == [-1, 0, 1]
    assert (out / "steer" / "score_vs_alpha.png").exists()
    assert f"layer {best}: highest cross-validated mean_diff AUROC" in capsys.readouterr().out


def test_cli_steer_names_missing_vectors(experiments: Path, capsys) -> None:
    base = ["--experiment", "tiny", "--experiments-dir", str(experiments), "--traits", "alpha"]
    assert main(["steer", *base]) == 2
    assert "no mean_diff vectors" in capsys.readouterr().err
