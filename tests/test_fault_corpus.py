"""Malformed input, as users write it: each case must end with exit status 2 and one line on
stderr that names the file and field (or the flag) and says what to do, with no traceback and no
file written under the experiment. Cases run in-process through the CLI's entry function."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import NATURAL, write_experiment

from tlextract.cli.main import main

Edit = Callable[[Path], None]  # changes the tiny experiment at <root>/tiny before the run


def _config(**changes: object) -> Edit:
    def edit(exp: Path) -> None:
        path = exp / "experiment.json"
        data = json.loads(path.read_text())
        for key, value in changes.items():
            if "." in key:
                outer, inner = key.split(".")
                data.setdefault(outer, {})[inner] = value
            else:
                data[key] = value
        path.write_text(json.dumps(data))

    return edit


def _trait(**changes: object) -> Edit:
    def edit(exp: Path) -> None:
        path = exp / "alpha" / "trait_definition.json"
        data = json.loads(path.read_text())
        data.update(changes)
        path.write_text(json.dumps(data))

    return edit


def _write(rel: str, content: str | bytes) -> Edit:
    def edit(exp: Path) -> None:
        path = exp / rel
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)

    return edit


def _utf16(rel: str) -> Edit:
    def edit(exp: Path) -> None:
        path = exp / rel
        path.write_bytes(path.read_text().encode("utf-16"))

    return edit


def _remove(rel: str) -> Edit:
    return lambda exp: (exp / rel).unlink()


def _natural(pol: str, lines: list[str]) -> Edit:
    return _write(f"alpha/natural_{pol}.txt", "\n".join(lines) + "\n")


PROMPTS = [f"Prompt number {i}?" for i in range(24)]
NATURAL_POS = NATURAL["pos"]
RUN = ["run", "--experiment", "tiny", "--traits", "alpha"]
NATURAL_RUN = [*RUN, "--variant", "natural"]

# (id, edit, argv, what the error line must name)
CASES: list[tuple[str, Edit | None, list[str], str]] = [
    # experiment.json
    (
        "config-not-json",
        _write("experiment.json", '{"model": "tiny-random",'),
        RUN,
        "experiment.json: not valid JSON",
    ),
    ("config-a-list", _write("experiment.json", "[]"), RUN, "'<top level>'"),
    ("config-utf16", _utf16("experiment.json"), RUN, "experiment.json: not UTF-8"),
    ("unknown-setting", _config(modle="x"), RUN, "'modle' is not a known setting"),
    ("model-missing", _config(model=None), RUN, "'model' must name a model"),
    ("model-empty", _config(model=""), RUN, "'model' must name a model"),
    ("hook-unknown", _config(hook="resid_sideways"), RUN, "'hook' must be one of"),
    ("style-unknown", _config(prompt_style="poem"), RUN, "'prompt_style'"),
    ("layers-word", _config(layers="some"), RUN, "'layers'"),
    ("layers-negative", _config(layers=[-1]), RUN, "'layers'"),
    ("layers-empty", _config(layers=[]), RUN, "'layers'"),
    ("n-examples-zero", _config(n_examples=0), RUN, "'n_examples' must be a positive integer"),
    ("n-examples-word", _config(n_examples="ten"), RUN, "'n_examples'"),
    ("batch-size-word", _config(batch_size="lots"), RUN, "'batch_size'"),
    ("seed-negative", _config(seed=-1), RUN, "'seed'"),
    ("variant-unknown", _config(variant="both"), RUN, "'variant' must be one of"),
    ("traits-empty", _config(traits=[]), RUN, "'traits' must list"),
    ("trait-missing", _config(traits=["alpha", "nope"]), RUN, "trait 'nope' has no"),
    ("traits-from-missing", _config(traits_from="nowhere"), RUN, "'traits_from'"),
    ("generation-a-list", _config(generation=[]), RUN, "'generation' must be an object"),
    ("generation-unknown-key", _config(**{"generation.temp": 1.0}), RUN, "'generation'"),
    (
        "max-new-tokens-zero",
        _config(**{"generation.max_new_tokens": 0}),
        RUN,
        "'generation.max_new_tokens'",
    ),
    (
        "temperature-negative",
        _config(**{"generation.temperature": -1.0}),
        RUN,
        "'generation.temperature' must be a number above 0",
    ),
    ("top-p-above-one", _config(**{"generation.top_p": 1.5}), RUN, "'generation.top_p'"),
    ("top-p-zero", _config(**{"generation.top_p": 0}), RUN, "'generation.top_p'"),
    ("do-sample-word", _config(**{"generation.do_sample": "yes"}), RUN, "'generation.do_sample'"),
    ("judge-oracle", _config(judge={"kind": "oracle"}), RUN, "'judge.kind'"),
    (
        "judge-openai-no-url",
        _config(judge={"kind": "openai", "model": "m"}),
        RUN,
        "'judge.base_url' is required",
    ),
    ("judge-unknown-key", _config(judge={"kind": "local", "modle": "self"}), RUN, "'judge.modle'"),
    (
        "judge-threshold",
        _config(judge={"kind": "none", "threshold": 150}),
        RUN,
        "'judge.threshold'",
    ),
    ("judge-min-kept", _config(judge={"kind": "none", "min_kept": 0}), RUN, "'judge.min_kept'"),
    ("judge-a-string", _config(judge="none"), RUN, "'judge' must be an object"),
    (
        "judge-timeout-word",
        _config(judge={"kind": "openai", "base_url": "u", "model": "m", "timeout": "soon"}),
        RUN,
        "'judge.timeout'",
    ),
    # trait_definition.json
    (
        "trait-not-json",
        _write("alpha/trait_definition.json", "{"),
        RUN,
        "trait_definition.json: not valid JSON",
    ),
    ("trait-utf16", _utf16("alpha/trait_definition.json"), RUN, "trait_definition.json: not UTF-8"),
    ("pairs-too-few", _trait(instruction=[{"pos": "a", "neg": "b"}]), RUN, "'instruction'"),
    (
        "pair-no-neg",
        _trait(instruction=[{"pos": f"p{i}"} for i in range(5)]),
        RUN,
        "'instruction[0].neg'",
    ),
    ("questions-too-few", _trait(questions=["q?"]), RUN, "'questions'"),
    ("questions-duplicate", _trait(questions=["same?"] * 24), RUN, "'questions' has duplicates"),
    (
        "eval-no-answer",
        _trait(eval_prompt="Rate {question}."),
        RUN,
        "'eval_prompt' is missing the placeholder {answer}",
    ),
    (
        "eval-unknown-placeholder",
        _trait(eval_prompt="Q {question} A {answer} R {response}"),
        RUN,
        "unknown placeholder {response}",
    ),
    ("eval-not-string", _trait(eval_prompt=5), RUN, "'eval_prompt' must be a string"),
    ("description-not-string", _trait(description=["x"]), RUN, "'description'"),
    # natural prompt files
    (
        "natural-binary",
        _write("alpha/natural_pos.txt", b"\x89PNG\r\n\x1a\n\x00\x00"),
        NATURAL_RUN,
        "natural_pos.txt: not UTF-8",
    ),
    (
        "natural-one-side",
        _remove("alpha/natural_neg.txt"),
        NATURAL_RUN,
        "natural_neg.txt: file not found",
    ),
    (
        "natural-empty-line",
        _natural("pos", PROMPTS[:3] + [""] + PROMPTS[3:]),
        NATURAL_RUN,
        "line 4 is empty",
    ),
    ("natural-duplicate", _natural("pos", PROMPTS + PROMPTS[:1]), NATURAL_RUN, "repeats line 1"),
    ("natural-too-few", _natural("pos", PROMPTS[:3]), NATURAL_RUN, "natural_pos.txt: 3 prompts"),
    (
        "natural-both-sides",
        _natural("neg", [*PROMPTS[1:], NATURAL_POS[0]]),
        NATURAL_RUN,
        "also appear in natural_pos.txt",
    ),
    (
        "natural-padded-line",
        _natural("pos", [" " + PROMPTS[0], *PROMPTS[1:]]),
        NATURAL_RUN,
        "leading or trailing spaces",
    ),
    # command-line flags
    ("device-tpu", None, [*RUN, "--device", "tpu"], "--device 'tpu'"),
    ("device-cuda-9", None, [*RUN, "--device", "cuda:9"], "--device cuda:9"),
    ("batch-size-flag-word", None, [*RUN, "--batch-size", "lots"], "--batch-size"),
    ("batch-size-flag-zero", None, [*RUN, "--batch-size", "0"], "--batch-size"),
    ("n-examples-flag-zero", None, [*RUN, "--n-examples", "0"], "--n-examples"),
    ("layers-flag-range", None, [*RUN, "--layers", "1-x"], "--layers"),
    ("layers-flag-too-deep", None, [*RUN, "--layers", "99"], "layers [99] do not exist"),
    ("mode-flag", None, [*RUN, "--mode", "sideways"], "--mode"),
    (
        "memory-budget-flag",
        None,
        [*RUN, "--batch-size", "auto", "--memory-budget", "-1"],
        "--memory-budget",
    ),
    (
        "trait-flag",
        None,
        ["run", "--experiment", "tiny", "--traits", "nope"],
        "unknown trait 'nope'",
    ),
    ("experiment-flag", None, ["run", "--experiment", "nope"], "unknown experiment 'nope'"),
    ("variant-flag", None, [*RUN, "--variant", "both"], "--variant"),
    ("dtype-flag", None, [*RUN, "--dtype", "int8"], "--dtype"),
    ("folds-too-many", None, ["report", *RUN[1:], "--folds", "50"], "--folds 50: use 2 to"),
    ("folds-one", None, ["report", *RUN[1:], "--folds", "1"], "--folds 1: use 2 to"),
    (
        "steer-auto-negative-kl",
        None,
        ["steer", *RUN[1:], "--auto", "--max-kl", "-1"],
        "--max-kl",
    ),
    ("model-flag-empty", None, [*RUN, "--model", " "], "--model"),
    (
        "model-flag-unknown",
        None,
        [*RUN, "--model", "no-such-model-xyz"],
        "unknown model 'no-such-model-xyz'",
    ),
]


def _files(root: Path) -> dict[str, float]:
    return {str(p.relative_to(root)): p.stat().st_mtime for p in root.rglob("*")}


@pytest.mark.parametrize(("edit", "argv", "needle"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])  # fmt: skip
def test_bad_input_gets_one_line_and_exit_2_and_writes_nothing(
    tmp_path: Path, capsys, edit: Edit | None, argv: list[str], needle: str
) -> None:
    if "cuda" in " ".join(argv) and torch.cuda.device_count() > 9:
        pytest.skip("this machine has a cuda:9")
    exp = write_experiment(tmp_path)
    if edit is not None:
        edit(exp)
    before = _files(tmp_path)
    try:
        code = main([*argv, "--experiments-dir", str(tmp_path)])
    except SystemExit as e:  # argparse rejects the flag itself
        code = e.code
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1, f"expected one line, got:\n{err}"
    assert "Traceback" not in err and needle in lines[0], lines[0]
    assert _files(tmp_path) == before, "a file was written or changed"


def test_the_corpus_is_large_and_covers_every_kind_of_input() -> None:
    assert len(CASES) >= 40
    assert len({c[0] for c in CASES}) == len(CASES)
