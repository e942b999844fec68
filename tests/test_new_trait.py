"""``tlextract new-trait``: a trait drafted by a chat model, against the scripted OpenAI-compatible
server the HTTP judge tests use (its ``[[draft=...]]`` directive, put in the description, names
the canned replies)."""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path

import pytest
from conftest import write_experiment
from local_server import control, started, use

from tlextract.cli.main import main
from tlextract.judge.draft import drafting_prompt, parse_reply
from tlextract.traits import load_trait

SERVER_SCRIPT = Path(__file__).with_name("fake_openai_server.py")
SECRET = "sk-test-SECRET-draft-456"
KEY_ENV = "TLX_TEST_DRAFT_KEY"
MODEL = "judge-model"


def draft(**overrides: object) -> dict:
    """A valid drafted trait, as the model is asked to reply."""
    data = {
        "description": "Positive pole (terse): the response is one short sentence. Negative pole "
        "(wordy): the response runs to many sentences.",
        "instruction": [
            {"pos": f"You answer tersely, way {i}.", "neg": f"You answer at length, way {i}."}
            for i in range(5)
        ],
        "extraction_questions": [f"What is thing {i}?" for i in range(20)],
        "evaluation_questions": [f"How does gadget {i} work?" for i in range(20)],
        "eval_prompt": "Score terseness.\nQuestion: {question}\nAnswer: {answer}\nNumber 0-100:",
        "natural": [
            {"pos": f"In one word, name fruit {i}.", "neg": f"At length, describe fruit {i}."}
            for i in range(70)
        ],
    }
    data.update(overrides)
    return data


@pytest.fixture(scope="module")
def server():
    env = dict(os.environ, FAKE_OPENAI_KEY=SECRET, FAKE_OPENAI_MODEL=MODEL)
    with started(SERVER_SCRIPT, env=env) as base:
        yield base


@pytest.fixture
def http(server, monkeypatch):
    """The server's base URL, reset, with the key in the environment and no proxy."""
    return use(server, monkeypatch, KEY_ENV, SECRET)


def reply_file(tmp_path: Path, name: str, data: dict, fenced: bool = False) -> Path:
    text = json.dumps(data, indent=1)
    if fenced:
        text = f"Here is the trait.\n```json\n{text}\n```\nGood luck!"
    path = tmp_path / name
    path.write_text(text)
    return path


def new_trait(experiments: Path, name: str, replies: list[Path], *flags: str) -> list[str]:
    description = "Terse against wordy answers."
    if replies:
        description += f" [[draft={','.join(map(str, replies))}]]"
    return ["new-trait", name, "--description", description, "--experiment", "tiny",
            "--experiments-dir", str(experiments), *flags]  # fmt: skip


def endpoint(base: str) -> list[str]:
    return ["--base-url", base, "--model", MODEL, "--api-key-env", KEY_ENV, "--yes"]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def no_staging_left(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.startswith(".")]


# ============================================================================================


def test_new_trait_writes_a_trait_that_loads_and_previews_it(http, experiments, tmp_path, capsys):
    config = (experiments / "tiny" / "experiment.json").read_text()
    reply = reply_file(tmp_path, "good.json", draft(), fenced=True)
    assert main(new_trait(experiments, "terse_wordy", [reply], *endpoint(http))) == 0
    trait = load_trait(experiments / "tiny" / "terse_wordy")
    d = draft()
    assert trait.questions == tuple(d["extraction_questions"] + d["evaluation_questions"])
    assert trait.natural is not None
    assert trait.natural["pos"][3] == "In one word, name fruit 3."
    assert trait.natural["neg"][3] == "At length, describe fruit 3."
    assert trait.eval_prompt == d["eval_prompt"] and len(trait.instructions) == 5
    out = capsys.readouterr().out
    shown = ["Positive pole (terse)", "way 1.", "What is thing 2?", "Score terseness.",
             "name fruit 2.", "describe fruit 2.", f"wrote {experiments / 'tiny'}"]  # fmt: skip
    assert [s for s in shown if s not in out] == []
    assert [s for s in ("way 2.", "thing 3?", "fruit 3.") if s in out] == []  # only a sample
    stats = control(http, "/stats")
    assert stats["requests"] == 1
    assert "Terse against wordy answers." in stats["last_messages"][0]["content"]
    assert (experiments / "tiny" / "experiment.json").read_text() == config  # not added to it
    assert no_staging_left(experiments / "tiny")
    assert trait.path.stat().st_mode & 0o777 == trait.path.parent.stat().st_mode & 0o777


def test_new_trait_uses_the_experiments_openai_judge_block(http, tmp_path, capsys):
    judge = {"kind": "openai", "base_url": http, "model": MODEL, "api_key_env": KEY_ENV}
    write_experiment(tmp_path / "exps", judge=judge)
    reply = reply_file(tmp_path, "good.json", draft())
    assert main(new_trait(tmp_path / "exps", "terse_wordy", [reply], "--yes")) == 0
    assert load_trait(tmp_path / "exps" / "tiny" / "terse_wordy").natural is not None
    assert control(http, "/stats")["requests"] == 1


def test_an_invalid_draft_is_sent_back_with_its_error(http, experiments, tmp_path, capsys):
    bad = reply_file(tmp_path, "bad.json", draft(instruction=draft()["instruction"][:3]))
    good = reply_file(tmp_path, "good.json", draft())
    assert main(new_trait(experiments, "terse_wordy", [bad, good], *endpoint(http))) == 0
    assert len(load_trait(experiments / "tiny" / "terse_wordy").instructions) == 5
    stats = control(http, "/stats")
    assert stats["requests"] == 2
    sent = stats["last_messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "user"]
    assert sent[1]["content"] == bad.read_text()
    feedback = sent[2]["content"]
    assert "trait_definition.json: field 'instruction' must be a list of at least 5" in feedback
    assert "found 3" in feedback and ".tmp" not in feedback  # no staging path


def test_three_invalid_drafts_write_nothing(http, experiments, tmp_path, capsys):
    bad = reply_file(tmp_path, "bad.json", draft(eval_prompt="Score it: {question}"))
    assert main(new_trait(experiments, "terse_wordy", [bad], *endpoint(http))) == 2
    err = one_line_error(capsys)
    assert "3 times" in err and "{answer}" in err
    assert control(http, "/stats")["requests"] == 3
    assert not (experiments / "tiny" / "terse_wordy").exists()
    assert no_staging_left(experiments / "tiny")


def test_an_existing_trait_needs_force_and_keeps_its_run_outputs(
    http, experiments, tmp_path, capsys
):
    alpha = experiments / "tiny" / "alpha"
    (alpha / "extraction").mkdir()
    (alpha / "extraction" / "meta.json").write_text("{}")
    before = {p.name: p.read_bytes() for p in alpha.iterdir() if p.is_file()}
    reply = reply_file(tmp_path, "good.json", draft())
    assert main(new_trait(experiments, "alpha", [reply], *endpoint(http))) == 2
    assert "--force" in one_line_error(capsys)
    assert {p.name: p.read_bytes() for p in alpha.iterdir() if p.is_file()} == before
    assert control(http, "/stats")["requests"] == 0

    assert main(new_trait(experiments, "alpha", [reply], *endpoint(http), "--force")) == 0
    assert load_trait(alpha).questions[0] == "What is thing 0?"
    assert (alpha / "natural_pos.txt").read_text().startswith("In one word, name fruit 0.\n")
    assert (alpha / "extraction" / "meta.json").read_text() == "{}"
    assert no_staging_left(experiments / "tiny")


@pytest.mark.parametrize(
    ("name", "flags", "expected"),
    [
        ("terse", ["--yes"], "pass --base-url and --model, or give"),
        ("terse", ["--base-url", "http://127.0.0.1:9", "--yes"], "pass --model, or give"),
        ("../evil", [], "trait name '../evil': use letters"),
        ("terse", ["--n-natural", "5"], "at least 20 pairs (got 5)"),
        ("terse", ["--api-key-env", "TLX_TEST_UNSET_KEY"], "TLX_TEST_UNSET_KEY, which is not set"),
    ],
)
def test_bad_input_fails_in_one_line_before_any_request(
    http, experiments, capsys, monkeypatch, name, flags, expected
):
    monkeypatch.delenv("TLX_TEST_UNSET_KEY", raising=False)
    if flags[:1] != ["--yes"] and flags[:1] != ["--base-url"]:
        flags = [*endpoint(http), *flags]  # a later --api-key-env wins
    before = sorted(os.listdir(experiments / "tiny"))
    assert main(new_trait(experiments, name, [], *flags)) == 2
    assert expected in one_line_error(capsys)
    assert control(http, "/stats")["requests"] == 0
    assert sorted(os.listdir(experiments)) == ["tiny"]
    assert sorted(os.listdir(experiments / "tiny")) == before


def test_a_missing_or_empty_description_is_refused(http, experiments, capsys):
    args = ["new-trait", "terse", "--experiment", "tiny", "--experiments-dir", str(experiments),
            *endpoint(http)]  # fmt: skip
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2 and "--description" in one_line_error(capsys)
    assert main([*args, "--description", "  "]) == 2
    assert "description is empty" in one_line_error(capsys)
    assert control(http, "/stats")["requests"] == 0


def test_without_yes_it_asks_and_a_no_writes_nothing(http, experiments, tmp_path, capsys,
                                                     monkeypatch):  # fmt: skip
    reply = reply_file(tmp_path, "good.json", draft())
    flags = endpoint(http)[:-1]  # no --yes
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))  # not a terminal: refused up front
    assert main(new_trait(experiments, "terse_wordy", [reply], *flags)) == 2
    assert "--yes" in one_line_error(capsys) and control(http, "/stats")["requests"] == 0

    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
    monkeypatch.setattr("builtins.input", lambda question: "n")
    assert main(new_trait(experiments, "terse_wordy", [reply], *flags)) == 2
    assert "not confirmed" in one_line_error(capsys)
    assert not (experiments / "tiny" / "terse_wordy").exists()
    assert no_staging_left(experiments / "tiny")

    monkeypatch.setattr("builtins.input", lambda question: "y")
    assert main(new_trait(experiments, "terse_wordy", [reply], *flags)) == 0
    assert load_trait(experiments / "tiny" / "terse_wordy").natural is not None


def test_a_refused_key_is_one_line_without_the_key(http, experiments, tmp_path, capsys,
                                                   monkeypatch):  # fmt: skip
    monkeypatch.setenv(KEY_ENV, SECRET + "-wrong")
    reply = reply_file(tmp_path, "good.json", draft())
    assert main(new_trait(experiments, "terse_wordy", [reply], *endpoint(http))) == 2
    err = one_line_error(capsys)
    assert "drafting server" in err and "HTTP 401" in err and KEY_ENV in err
    assert SECRET not in err
    assert control(http, "/stats")["requests"] == 1  # not retried
    assert not (experiments / "tiny" / "terse_wordy").exists()
    assert no_staging_left(experiments / "tiny")


def test_the_prompt_asks_for_every_part_and_replies_may_carry_prose() -> None:
    prompt = drafting_prompt("terse_wordy", "Terse against wordy.", n_natural=80)
    for part in ('"instruction"', '"extraction_questions"', '"evaluation_questions"',
                 '"eval_prompt"', "{question}", "{answer}", '"natural": a list of 80'):  # fmt: skip
        assert part in prompt
    assert parse_reply('Sure:\n{"a": 1}\nDone.') == {"a": 1}
    assert parse_reply('```\n{"a": [1, 2]}\n```') == {"a": [1, 2]}
