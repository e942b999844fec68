"""What a new user runs into on the tiny model, each ending in a result or one clear line, never
a traceback: degenerate but valid data, odd paths, notebook calls, and a real bug."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import tlextract.cli.main as cli
from tlextract.config import load_experiment
from tlextract.errors import TLExtractError
from tlextract.ops.trait_vectors import TraitVectors
from tlextract.stages.extract import extract

RUN = ["run", "--experiment", "tiny", "--traits", "alpha"]


def _cli(experiments: Path, capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main([*(argv or RUN), "--experiments-dir", str(experiments)])
    out, err = capsys.readouterr()
    return code, out, err


def _one_error(err: str) -> str:
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def test_one_token_responses_leave_the_bag_of_words_baseline_unavailable_not_a_crash(
    experiments: Path, capsys
) -> None:
    config = experiments / "tiny" / "experiment.json"
    data = json.loads(config.read_text())
    data["generation"]["max_new_tokens"] = 1
    config.write_text(json.dumps(data))
    code, out, err = _cli(experiments, capsys)
    assert code == 0 and "Traceback" not in err, err
    assert "The bag_of_words baseline is unavailable: text classifier: the" in out
    assert "generation.max_new_tokens" in out
    md = next(experiments.rglob("crossval.md")).read_text()
    assert "| bag_of_words | baseline | unavailable:" in md


def test_a_file_where_the_run_directory_goes_is_named_in_one_line(
    experiments: Path, capsys
) -> None:
    blocker = experiments / "tiny" / "alpha" / "extraction"
    blocker.write_text("not a directory")
    code, _, err = _cli(experiments, capsys)
    assert code == 2
    assert f"{blocker} is a file, not a directory; move or remove that file" in _one_error(err)
    assert blocker.read_text() == "not a directory"


def test_an_experiments_dir_that_is_a_file_says_so(tmp_path: Path, capsys) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    code, _, err = _cli(afile, capsys, "run", "--experiment", "x")
    assert code == 2
    line = _one_error(err)
    assert line.startswith(f"error: --experiments-dir: {afile} is a file, not a directory")
    with pytest.raises(TLExtractError, match=r"load_experiment\(root=...\): .* is a file"):
        load_experiment("x", str(afile))


class _Where(os.PathLike):
    """A path type that is not pathlib's (as other libraries have)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __fspath__(self) -> str:
        return str(self.path)


@pytest.mark.parametrize("kind", [str, _Where], ids=["str", "os.PathLike"])
def test_public_functions_take_str_and_pathlike_paths(
    experiments: Path, tmp_path: Path, kind: type, monkeypatch
) -> None:
    vectors = TraitVectors("t", "mean_diff", "m", "resid_post", (0, 1), torch.randn(2, 4))
    monkeypatch.chdir(tmp_path)  # a bare relative name, as a notebook passes it
    vectors.save(kind(Path("out.pt")))
    vectors.save_safetensors(kind(tmp_path / "out.safetensors"))
    for name in ("out.pt", "out.safetensors"):
        assert torch.equal(TraitVectors.load(kind(Path(name))).vectors, vectors.vectors)
    exp = load_experiment("tiny", kind(experiments))
    assert exp.traits == ("alpha", "beta")


def test_evaluate_with_too_few_examples_names_its_keyword_not_a_cli_flag(tiny_model) -> None:
    pairs = [(f"Question {i}?", f"Answer number {i}.") for i in range(3)]
    result = extract(tiny_model, pairs, [(p, r + " No.") for p, r in pairs], layers=[0, 1])
    with pytest.raises(TLExtractError, match=r"use fewer folds \(evaluate\(folds=...\)\)") as e:
        result.evaluate()
    assert "--folds" not in str(e.value)
    assert result.evaluate(folds=3).layer in (0, 1)


def test_a_bug_is_one_line_naming_the_log_with_its_traceback(
    experiments: Path, capsys, monkeypatch
) -> None:
    def broken(*args, **kwargs):
        raise ZeroDivisionError("planted")

    monkeypatch.setattr(cli, "run_trait", broken)
    code, _, err = _cli(experiments, capsys)
    assert code == 1
    line = _one_error(err)
    assert line.startswith("error: a bug in tlextract (ZeroDivisionError: planted)")
    log = Path(line.split("the full traceback is in ")[1].split(". Please")[0])
    assert log.parent == experiments / "tiny" and "Traceback" in log.read_text()
    assert "broken" in log.read_text() and "report it" in line

    code, _, err = _cli(experiments, capsys, *RUN, "--debug")
    assert code == 1 and "Traceback" in err and 'raise ZeroDivisionError("planted")' in err
