"""Flags declared once: the CLI's choices are the library's constants, every subcommand is a row
of COMMANDS, and a library error names parameters that the CLI prints as its flags."""

from __future__ import annotations

import inspect

import pytest
from conftest import write_experiment

from tlextract.cli.main import COMMANDS, build_parser, main
from tlextract.cli.options import FLAG_OF, flag_message
from tlextract.config import ENGINE_KINDS, load_experiment
from tlextract.errors import TLExtractError
from tlextract.ops.trait_vectors import TraitVectors
from tlextract.settings import DTYPE_CHOICES, JUDGE_OVERRIDES, STAGES, settings_for


def _choices(command: str, flag: str) -> tuple[str, ...]:
    sub = build_parser()._subparsers._group_actions[0].choices[command]  # type: ignore[union-attr]
    action = next(a for a in sub._actions if flag in a.option_strings)
    return tuple(action.choices)


@pytest.mark.parametrize("command", ["run", "steer"])
def test_choices_are_the_library_constants(command: str) -> None:
    assert _choices(command, "--engine") == ENGINE_KINDS
    assert _choices(command, "--dtype") == DTYPE_CHOICES
    assert _choices(command, "--judge") == JUDGE_OVERRIDES


def test_generate_and_responses_run_the_first_stage() -> None:
    assert (
        COMMANDS["generate"].stages == (STAGES[0],) and "responses" in COMMANDS["generate"].aliases
    )
    assert build_parser().parse_args(["responses"]).command == "responses"
    assert COMMANDS["run"].stages == STAGES


@pytest.mark.parametrize(
    ("overrides", "library", "cli"),
    [
        ({"engine": "x"}, "engine='x': use one of", "--engine 'x': use one of"),
        ({"dtype": "int8"}, "dtype='int8' is unknown", "--dtype 'int8' is unknown"),
        ({"batch_size": 0}, "batch_size must be an integer", "--batch-size must be an integer"),
        ({"memory_budget_gib": -1.0}, "memory_budget_gib must be", "--memory-budget must be"),
        ({"engine": "tl", "vllm_url": "http://h:1/v1"}, 'with engine="vllm"', "with --engine vllm"),
    ],
)
def test_library_errors_name_parameters_and_the_cli_shows_flags(
    tmp_path, overrides: dict, library: str, cli: str
) -> None:
    exp = load_experiment("tiny", write_experiment(tmp_path).parent)
    with pytest.raises(TLExtractError) as e:
        settings_for(exp, "alpha", **overrides)
    assert library in str(e.value) and "--" not in str(e.value)
    assert cli in flag_message(e.value)


def test_only_the_named_parameters_become_flags() -> None:
    error = TLExtractError('mode="combined" needs engine="tl"; model=x', parameters=("mode",))
    assert flag_message(error) == '--mode combined needs engine="tl"; model=x'


def test_every_translated_parameter_is_a_library_parameter() -> None:
    from tlextract.judge.draft import check_destination
    from tlextract.model.load import load_model
    from tlextract.report.summary import build_report
    from tlextract.steering.autosteer import auto_steer
    from tlextract.steering.sweep import alpha_sweep

    # load_model: its backend= is what --model-backend's errors name.
    functions = (settings_for, build_report, auto_steer, alpha_sweep, check_destination, load_model)
    names = {p for f in functions for p in inspect.signature(f).parameters}
    assert set(FLAG_OF) <= names


def test_agreement_is_a_subcommand_with_the_shared_error_handling(tmp_path, capsys) -> None:
    write_experiment(tmp_path)
    code = main(["agreement", "--experiment", "tiny", "--experiments-dir", str(tmp_path)])
    assert code == 2 and "tiny: no responses yet" in capsys.readouterr().err


def _raised(call) -> TLExtractError:
    with pytest.raises(TLExtractError) as e:
        call()
    return e.value


def test_the_analyses_errors_name_parameters_too(tmp_path, tiny_model) -> None:
    import torch

    from tlextract.judge.draft import check_destination
    from tlextract.ops.folds import fold_of
    from tlextract.ops.pool import resolve_layers
    from tlextract.steering.autosteer import auto_steer
    from tlextract.steering.sweep import held_out_questions

    (tmp_path / "alpha").mkdir()
    run = settings_for(load_experiment("tiny", write_experiment(tmp_path).parent), "alpha")
    d = tiny_model.cfg.d_model
    vectors = TraitVectors("alpha", "mean_diff", "tiny", "resid_post", (0,), torch.ones(1, d))
    cases = [
        (lambda: resolve_layers([9], 4), "Fix layers=.", "Fix --layers."),
        (lambda: fold_of([1, 2], 5), "fewer folds (folds=)", "fewer folds (--folds)"),
        (lambda: check_destination(tmp_path, "alpha", False), "force=True", "pass --force to"),
        (lambda: held_out_questions(run, 0), "n_questions must", "--n-questions must"),
        (lambda: auto_steer(tiny_model, run, vectors, pole="up"), "pole='up'", "--pole 'up'"),
        (lambda: auto_steer(tiny_model, run, vectors, max_kl=0.0), "max_kl=, max_logprob_drop= and",
         "--max-kl, --max-logprob-drop and --alphas must"),
    ]  # fmt: skip
    for call, library, cli in cases:
        error = _raised(call)
        assert library in str(error) and "--" not in str(error)
        assert cli in flag_message(error)
