"""A property-based fuzzer of the command line (hypothesis): valid experiment files, trait files,
natural prompt files and argument lists, mutated (values of other types, keys removed and added,
huge and negative numbers, unicode, empty and binary files), each run in-process through the
CLI's entry function. Every case must end in exit 0, or exit 2 with one line and no file
written; never a traceback, never a bug (exit 1).

Valid cases that would mean real work (many examples, long generations, a remote judge) are
checked up to the point where work starts: ``run_trait`` then runs no stage, so it still makes
every check it makes before its lock, and the budget stays inside the suite's time.

Budget: ``TLEXTRACT_FUZZ_EXAMPLES`` cases (default 150, about a minute here), derandomised so
the suite is repeatable; ``TLEXTRACT_FUZZ_SEED=<n>`` explores a different seeded sequence. A
case that found a bug is kept below as an ``@example``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from conftest import write_experiment
from hypothesis import HealthCheck, example, given, seed, settings
from hypothesis import strategies as st

import tlextract.cli.main as cli
from tlextract.stages.run import run_trait

EXAMPLES = int(os.environ.get("TLEXTRACT_FUZZ_EXAMPLES", "150"))
SEED = os.environ.get("TLEXTRACT_FUZZ_SEED")
SMALL = {"n_examples": 4, "max_new_tokens": 4}  # a valid case above these skips the stages

# Values of every JSON type, huge and negative numbers, unicode.
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**20), 10**20), st.sampled_from([0, 1, 2, -1]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["", " ", "all", "auto", "tiny-random", "ünïcødé ✓", "a/b", "..", "\x00"]),
)  # fmt: skip
values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6),
                                                                         inner, max_size=3),
    max_leaves=6,
)  # fmt: skip
EXPERIMENT_KEYS = ["model", "layers", "hook", "prompt_style", "n_examples", "batch_size", "seed",
                   "generation", "judge", "traits", "variant", "traits_from"]  # fmt: skip
TRAIT_KEYS = ["description", "instruction", "questions", "eval_prompt"]
NESTED = {
    "generation": ["max_new_tokens", "temperature", "top_p", "do_sample"],
    "judge": ["kind", "threshold", "min_kept", "base_url", "model", "api_key_env"],
}


@st.composite
def json_edit(draw: st.DrawFn, keys: list[str]) -> tuple[str, ...]:
    """One mutation of a JSON object: ("set", key, value), ("del", key) or ("sub", key, inner,
    value) for a key of a nested object."""
    kind = draw(st.sampled_from(["set", "del", "extra", "sub"]))
    if kind == "sub" and any(k in NESTED for k in keys):
        outer = draw(st.sampled_from([k for k in keys if k in NESTED]))
        return ("sub", outer, draw(st.sampled_from(NESTED[outer])), draw(values))
    if kind == "extra":
        return ("set", draw(st.text(min_size=1, max_size=8)), draw(values))
    return (kind if kind == "del" else "set", draw(st.sampled_from(keys)), draw(values))


file_bodies = st.one_of(
    st.just(b""), st.binary(max_size=40), st.text(max_size=60).map(str.encode),
    st.sampled_from([b"\xff\xfe{\x00}\x00", b"{", b"[]", b"null", "{\"ü\": 1}".encode()]),
)  # fmt: skip
FLAGS: dict[str, st.SearchStrategy[str]] = {
    "--n-examples": st.sampled_from(["0", "-3", "2", "4", "99999999999999999999", "x"]),
    "--batch-size": st.sampled_from(["0", "1", "2", "auto", "-1", "1e9", "lots"]),
    "--layers": st.sampled_from(["all", "0", "0,1", "1-2", "2-1", "99", "-1", "a-b", ""]),
    "--mode": st.sampled_from(["two-stage", "combined", "sideways"]),
    "--variant": st.sampled_from(["instruction", "natural", "all", "both"]),
    "--judge": st.sampled_from(["none", "local", "oracle"]),
    "--model": st.sampled_from(["tiny-random", "", " ", "no-such-model", "ünï", "x" * 300]),
    "--traits": st.sampled_from(["alpha", "beta", "all", "alpha,beta", "nope", ",", ""]),
    "--experiment": st.sampled_from(["tiny", "nope", "", "..", "x" * 300, "tiny/alpha"]),
    "--memory-budget": st.sampled_from(["1", "0", "-1", "nan", "inf", "x"]),
    "--dtype": st.sampled_from(["float32", "int8"]),
    "--device": st.sampled_from(["cpu", "tpu", "cuda:9", ""]),
}
COMMANDS = ["run", "generate", "judge", "activations", "vectors", "report", "steer", "monitor",
            "screen", "compare"]  # fmt: skip
# screen's --data: a valid file and broken ones (a missing field, empty, no response, binary).
DATA = [
    '{"prompt": "Hi?", "response": "Hello."}\n',
    '{"prompt": "Hi?"}\n',
    "",
    '{"messages": [{"role": "user", "content": "a"}]}\n',
    "\x00\xff",
]


@st.composite
def command_lines(draw: st.DrawFn) -> list[str]:
    command = draw(st.sampled_from(COMMANDS))
    argv = [command, "--experiment", "tiny", "--traits", "alpha"]
    for flag in draw(st.lists(st.sampled_from(sorted(FLAGS)), max_size=3, unique=True)):
        argv += [flag, draw(FLAGS[flag])]
    if command == "monitor":
        argv += ["--prompt", draw(st.text(min_size=1, max_size=20))]
    if command == "steer":
        argv += ["--n-questions", "2"]
    if command == "compare":
        argv += ["--other", draw(st.sampled_from(["tiny-random", "", "no-such-model", "./nope"]))]
    if command == "screen":
        argv += ["--data", "data.jsonl", "--max-samples", draw(st.sampled_from(["1", "0", "x"]))]
    return argv


cases = st.fixed_dictionaries({
    "experiment": st.lists(json_edit(EXPERIMENT_KEYS), max_size=2),
    "trait": st.lists(json_edit(TRAIT_KEYS), max_size=2),
    "files": st.lists(st.tuples(st.sampled_from(["experiment.json", "alpha/trait_definition.json",
                                                 "alpha/natural_pos.txt", "alpha/natural_neg.txt"]),
                                file_bodies), max_size=1),
    "argv": command_lines(),
    "data": st.sampled_from(DATA),
})  # fmt: skip


def _apply(path: Path, edits: list[tuple[str, ...]]) -> None:
    data: Any = json.loads(path.read_text())
    for edit in edits:
        if edit[0] == "del":
            data.pop(edit[1], None)
        elif edit[0] == "set":
            data[edit[1]] = edit[2]
        elif isinstance(data.get(edit[1]), dict):
            data[edit[1]][edit[2]] = edit[3]
        else:
            data[edit[1]] = {edit[2]: edit[3]}
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


def _files(root: Path) -> dict[str, int]:
    """Every path and each file's mtime (a directory made and removed again leaves no trace
    but its parent's mtime)."""
    return {str(p.relative_to(root)): p.stat().st_mtime_ns if p.is_file() else 0
            for p in root.rglob("*")}  # fmt: skip


def _small(run: Any) -> bool:
    gen = run.experiment.generation
    return (run.n_examples <= SMALL["n_examples"] and gen.max_new_tokens <= SMALL["max_new_tokens"]
            and run.judge.get("kind") == "none")  # fmt: skip


def _bounded_run_trait(run: Any, stages: Any, *args: Any, **kwargs: Any) -> Any:
    """The real run_trait; a valid but big run makes its checks and runs no stage."""
    return run_trait(run, stages if _small(run) else (), *args, **kwargs)


def _fuzz_settings(test: Any) -> Any:
    decorated = settings(
        max_examples=EXAMPLES, deadline=None, database=None, derandomize=SEED is None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )(test)  # fmt: skip
    return seed(int(SEED))(decorated) if SEED is not None else decorated


RAN = {"cases": 0}


@_fuzz_settings
@given(case=cases)
# Regression cases the fuzzer found (each broke the property before its fix):
# seed 1: a setting named "\r" split the error line in two.
@example(case={"experiment": [("set", "\r", None)], "trait": [], "files": [], "data": "",
               "argv": ["run", "--experiment", "tiny", "--traits", "alpha"]})  # fmt: skip
def test_every_mutated_input_ends_in_exit_0_or_one_line_and_exit_2(
    case: dict[str, Any], tmp_path_factory, monkeypatch, capsys
) -> None:
    RAN["cases"] += 1
    root = tmp_path_factory.mktemp("fuzz")
    exp = write_experiment(root, n_examples=SMALL["n_examples"],
                           generation={"max_new_tokens": SMALL["max_new_tokens"]})  # fmt: skip
    _apply(exp / "experiment.json", case["experiment"])
    _apply(exp / "alpha" / "trait_definition.json", case["trait"])
    for rel, body in case["files"]:
        (exp / rel).write_bytes(body)
    argv = [str(root / a) if a == "data.jsonl" else a for a in case["argv"]]
    (root / "data.jsonl").write_text(case["data"], encoding="utf-8")
    before = _files(root)
    monkeypatch.setattr(cli, "run_trait", _bounded_run_trait)
    capsys.readouterr()
    try:
        code = cli.main([*argv, "--experiments-dir", str(root)])
    except SystemExit as e:  # argparse refuses the flag itself
        code = e.code
    _, err = capsys.readouterr()
    assert "Traceback" not in err, err
    assert code in (0, 2), f"exit {code}:\n{err}"
    if code == 2:
        lines = [
            line
            for line in err.replace("\r", "\n").splitlines()
            if line.strip() and not line.startswith("warning:") and "%|" not in line
        ]  # progress bars
        assert len(lines) == 1 and lines[0].startswith("error:"), err
        assert _files(root) == before, "exit 2 wrote or changed a file"


def test_the_fuzzer_ran_its_budget() -> None:
    """Recorded for the suite's report: how many generated cases the property above ran."""
    if RAN["cases"] == 0:
        pytest.skip("the fuzz test was deselected")
    print(f"fuzzer: {RAN['cases']} cases")
    assert RAN["cases"] >= min(EXAMPLES, 50)
