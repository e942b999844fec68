"""Trait and experiment files: good ones load, each kind of broken one gets its own clear error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import PAIRS, QUESTIONS, write_experiment, write_trait

from tlextract.config import load_experiment
from tlextract.errors import TLExtractError
from tlextract.settings import settings_for, trait_dir
from tlextract.traits import load_trait, plan_examples

BROKEN_TRAITS = [
    ({"instruction": PAIRS[:3]}, "field 'instruction' must be a list of at least 5"),
    ({"instruction": "be local"}, "field 'instruction' must be a list"),
    ({"instruction": [*PAIRS[:4], {"pos": "x"}]}, "field 'instruction[4].neg' must be a non-empty"),
    ({"instruction": [*PAIRS[:4], {"pos": "  ", "neg": "y"}]}, "'instruction[4].pos'"),
    ({"questions": QUESTIONS[:5]}, "field 'questions' must be a list of at least 20"),
    ({"questions": [*QUESTIONS[:20], ""]}, "field 'questions[20]' must be a non-empty string"),
    ({"questions": [*QUESTIONS, QUESTIONS[0]]}, "field 'questions' has duplicates"),
    ({"eval_prompt": "Score {question} please."}, "missing the placeholder {answer}"),
    ({"eval_prompt": "Score {answer} please."}, "missing the placeholder {question}"),
    ({"eval_prompt": None}, "field 'eval_prompt' must be a string"),
]


@pytest.mark.parametrize(("override", "message"), BROKEN_TRAITS)
def test_broken_trait_definition_is_rejected_naming_file_and_field(
    tmp_path: Path, override: dict, message: str
) -> None:
    d = write_trait(tmp_path, "broken", **override)
    with pytest.raises(TLExtractError) as err:
        load_trait(d)
    assert str(d / "trait_definition.json") in str(err.value)
    assert message in str(err.value)


def test_invalid_json_reports_line_and_column(tmp_path: Path) -> None:
    d = tmp_path / "bad"
    d.mkdir()
    (d / "trait_definition.json").write_text('{"instruction": [\n  {"pos": "a" "neg": "b"}]}')
    with pytest.raises(TLExtractError, match=r"not valid JSON \(line 2, column"):
        load_trait(d)


def test_missing_trait_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(TLExtractError, match="trait_definition.json: file not found"):
        load_trait(tmp_path / "nothing")


def test_valid_trait_loads(tmp_path: Path) -> None:
    trait = load_trait(write_trait(tmp_path, "ok"))
    assert trait.name == "ok"
    assert len(trait.instructions) == 5 and trait.instructions[0].pos == PAIRS[0]["pos"]
    assert trait.questions == tuple(QUESTIONS)


BROKEN_EXPERIMENTS = [
    ({"layer": [1]}, "field 'layer' is not a known setting"),
    ({"model": 3}, "field 'model' must name a model"),
    ({"layers": [-1]}, "field 'layers' must be \"all\" or a non-empty list"),
    ({"layers": []}, "field 'layers'"),
    ({"prompt_style": "raw"}, "field 'prompt_style'"),
    ({"n_examples": 0}, "field 'n_examples' must be a positive integer"),
    ({"batch_size": "8"}, "field 'batch_size' must be a positive integer"),
    ({"generation": {"max_tokens": 3}}, "field 'generation' must be an object with keys among"),
    ({"traits": []}, "field 'traits' must list at least one trait"),
    ({"traits": ["alpha", "gamma"]}, "trait 'gamma' has no"),
]


@pytest.mark.parametrize(("override", "message"), BROKEN_EXPERIMENTS)
def test_broken_experiment_is_rejected(tmp_path: Path, override: dict, message: str) -> None:
    exp = write_experiment(tmp_path, **{"traits": ["alpha"], **override})
    if override.get("traits") == ["alpha", "gamma"]:
        (exp / "gamma" / "trait_definition.json").unlink()
    with pytest.raises(TLExtractError) as err:
        load_experiment("tiny", tmp_path)
    assert str(exp / "experiment.json") in str(err.value)
    assert message in str(err.value)


def test_unknown_experiment_lists_known_ones(experiments: Path) -> None:
    with pytest.raises(TLExtractError, match="unknown experiment 'nope'.*tiny"):
        load_experiment("nope", experiments)


def test_unknown_trait_lists_the_experiments_traits(experiments: Path) -> None:
    exp = load_experiment("tiny", experiments)
    with pytest.raises(TLExtractError, match="unknown trait 'gamma'. This experiment has: alpha"):
        exp.trait("gamma")


def test_traits_from_shares_definitions_without_copies(experiments: Path) -> None:
    write_experiment(experiments, "borrower", traits_from="tiny", traits=["beta"])
    exp = load_experiment("borrower", experiments)
    assert exp.trait("beta").path == experiments / "tiny" / "beta"
    # outputs still go under the borrowing experiment
    assert trait_dir(exp, "beta") == experiments / "borrower" / "beta" / "extraction"


def test_a_borrower_may_bring_its_own_natural_prompts(experiments: Path) -> None:
    # A base model needs prompts in its own style; the definitions stay shared.
    root = write_experiment(experiments, "borrower", traits_from="tiny", traits=["alpha", "beta"])
    own = {"pos": [f"Q-style pos prompt {i}?" for i in range(20)],
           "neg": [f"Q-style neg prompt {i}?" for i in range(20)]}  # fmt: skip
    (root / "alpha").mkdir()
    for pol, lines in own.items():
        (root / "alpha" / f"natural_{pol}.txt").write_text("\n".join(lines) + "\n")
    exp = load_experiment("borrower", experiments)
    alpha, beta = exp.trait("alpha"), exp.trait("beta")
    assert alpha.path == experiments / "tiny" / "alpha"  # the definition is the lender's
    assert alpha.natural == {pol: tuple(lines) for pol, lines in own.items()}
    assert beta.natural == load_experiment("tiny", experiments).trait("beta").natural


def test_a_borrowers_broken_natural_file_fails_at_load(experiments: Path) -> None:
    root = write_experiment(experiments, "borrower", traits_from="tiny", traits=["alpha"])
    (root / "alpha").mkdir()
    (root / "alpha" / "natural_pos.txt").write_text("only one side\n")
    with pytest.raises(TLExtractError, match="natural_neg.txt: file not found"):
        load_experiment("borrower", experiments)


def test_traits_from_must_exist(tmp_path: Path) -> None:
    write_experiment(tmp_path, traits_from="missing", traits=["alpha"])
    with pytest.raises(TLExtractError, match="'traits_from' names 'missing'"):
        load_experiment("tiny", tmp_path)


def test_plan_uses_every_question_and_spreads_pairs_evenly(tmp_path: Path) -> None:
    trait = load_trait(write_trait(tmp_path, "t"))
    plan = plan_examples(trait, 24 * 5)
    assert len(set(plan)) == len(plan)  # no (question, pair) repeats until all are used
    assert {q for q, _ in plan[:24]} == set(range(24))
    per_pair = [sum(p == k for _, p in plan[:50]) for k in range(5)]
    assert max(per_pair) - min(per_pair) <= 1


def test_shipped_experiments_load() -> None:
    root = Path(__file__).parent.parent / "experiments"
    for config in root.glob("*/experiment.json"):
        exp = load_experiment(config.parent.name, root)
        for t in exp.traits:
            exp.trait(t)
    assert json.loads((root / "smollm2_cognitive" / "experiment.json").read_text())["traits"]


BROKEN_NATURAL = [
    ("pos", "\n", "line 1 is empty"),
    ("pos", "A\n\nB\n", "line 2 is empty"),
    ("neg", " padded\n", "line 1 has leading or trailing spaces"),
    (
        "pos",
        "".join(f"q{i}\n" for i in range(5)),
        "5 prompts; natural elicitation needs at least 20",
    ),
    ("neg", "".join(f"q{i % 21}\n" for i in range(22)), "line 22 repeats line 1"),
]


@pytest.mark.parametrize(("side", "text", "message"), BROKEN_NATURAL)
def test_broken_natural_prompts_are_rejected_with_file_and_line(
    tmp_path: Path, side: str, text: str, message: str
) -> None:
    d = write_trait(tmp_path, "t")
    (d / f"natural_{side}.txt").write_text(text)
    with pytest.raises(TLExtractError) as err:
        load_trait(d)
    assert str(d / f"natural_{side}.txt") in str(err.value) and message in str(err.value)


def test_natural_prompt_on_both_sides_is_rejected(tmp_path: Path) -> None:
    d = write_trait(tmp_path, "t")
    lines = [f"shared {i}" for i in range(20)]
    (d / "natural_pos.txt").write_text("\n".join(lines) + "\n")
    (d / "natural_neg.txt").write_text("\n".join([*lines[:1], *(f"x{i}" for i in range(20))]))
    with pytest.raises(TLExtractError, match="also appear in natural_pos.txt, e.g. 'shared 0'"):
        load_trait(d)


def test_natural_prompts_need_both_sides(tmp_path: Path) -> None:
    d = write_trait(tmp_path, "t")
    (d / "natural_neg.txt").unlink()
    with pytest.raises(TLExtractError, match="natural_neg.txt: file not found; natural prompts"):
        load_trait(d)


def test_trait_without_natural_files_has_none(tmp_path: Path) -> None:
    assert load_trait(write_trait(tmp_path, "t", natural=False)).natural is None


def test_experiment_variant_sets_the_runs_default_and_is_validated(tmp_path: Path) -> None:
    write_experiment(tmp_path, variant="natural")
    exp = load_experiment("tiny", tmp_path)
    assert settings_for(exp, "alpha").variant == "natural"
    assert settings_for(exp, "alpha", variant="instruction").variant == "instruction"
    write_experiment(tmp_path, variant="spontaneous")
    with pytest.raises(TLExtractError, match="field 'variant' must be one of instruction, natural"):
        load_experiment("tiny", tmp_path)
