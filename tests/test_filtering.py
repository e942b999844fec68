"""The judge stage: the keep rule, cached judgments, failures never counted, too few kept."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tlextract.config import load_experiment
from tlextract.errors import TLExtractError
from tlextract.judge.base import Score
from tlextract.settings import settings_for
from tlextract.stages.activations import load_activations
from tlextract.stages.judge import load_selection
from tlextract.stages.run import run_trait

pytestmark = pytest.mark.usefixtures("one_thread")


class FakeJudge:
    """Scores by a rule on the filled prompt, and counts the prompts it was asked about."""

    name = "fake"

    def __init__(self, rule):
        self.rule = rule
        self.calls = 0

    def score(self, prompts: list[str]) -> list[Score]:
        self.calls += len(prompts)
        return [self.rule(p) for p in prompts]


def _settings(experiments: Path, judge: FakeJudge, **kw):
    exp = load_experiment("tiny", experiments)
    return settings_for(exp, "alpha", judge=judge, **kw)


def _by_question(high: set[int]):
    """Trait 100 for questions whose number is in ``high``, else 0; coherence always 90."""

    def rule(prompt: str) -> Score:
        if prompt.startswith("Rate the answer."):
            number = int(prompt.split("topic number ")[1].split(".")[0])
            return Score(100.0 if number in high else 0.0)
        return Score(90.0)

    return rule


def test_vectors_use_only_kept_examples(experiments: Path, monkeypatch) -> None:
    # Questions 0-5 are used (n_examples=6). Score 100 for questions 0-3: pos examples 0-3 are
    # kept, negatives 4-5 (score 0) are kept; the rest fail the rule.
    run = _settings(experiments, FakeJudge(_by_question({0, 1, 2, 3})), n_examples=6)
    monkeypatch.setitem(run.judge, "min_kept", 2)
    vectors = run_trait(run)
    sel = load_selection(run)
    assert sel.kept == {"pos": [0, 1, 2, 3], "neg": [4, 5]}
    assert sel.summary["mean_score"]["pos"] == pytest.approx(100 * 4 / 6, abs=0.01)
    acts = load_activations(run)
    ref = acts.pos[:4].mean(0) - acts.neg[4:6].mean(0)
    torch.testing.assert_close(vectors.vectors, ref)
    assert vectors.metadata["kept"] == {"pos": 4, "neg": 2}


def test_a_rerun_issues_zero_judge_calls(experiments: Path, monkeypatch) -> None:
    judge = FakeJudge(_by_question(set(range(24))))
    run = _settings(experiments, judge, n_examples=6)
    monkeypatch.setitem(run.judge, "min_kept", 0)
    run_trait(run)
    assert judge.calls == 2 * 12  # trait + coherence for 12 responses
    (run.stage_dir("judge") / "meta.json").unlink()  # force the stage to run again
    run_trait(run)
    assert judge.calls == 24


def test_failed_judgments_are_never_counted_or_cached(experiments: Path, monkeypatch) -> None:
    flaky = FakeJudge(lambda p: Score.failure("timeout") if "number 2." in p else Score(80.0))
    run = _settings(experiments, flaky, n_examples=6)
    with pytest.raises(TLExtractError, match="2 of 12 judgments failed"):
        run_trait(run)
    assert not (run.stage_dir("judge") / "meta.json").exists()
    assert not run.stage_dir("vectors").exists()
    cached = [json.loads(line) for line in (run.stage_dir("judge") / "judge_cache.jsonl").open()]
    assert len(cached) == 2 * 12 - 4 and all(r["score"] == 80.0 for r in cached)
    healed = FakeJudge(lambda p: Score(80.0))
    run = _settings(experiments, healed, n_examples=6)
    monkeypatch.setitem(run.judge, "min_kept", 0)
    run_trait(run)
    assert healed.calls == 4  # only the failed ones are asked again


def test_too_few_kept_stops_before_vectors_with_advice(experiments: Path) -> None:
    run = _settings(experiments, FakeJudge(_by_question(set())), n_examples=6)  # all score 0
    with pytest.raises(TLExtractError, match=r"only 0 pos responses kept .*--judge none"):
        run_trait(run)
    assert not run.stage_dir("vectors").exists()


def test_judge_none_keeps_everything(experiments: Path) -> None:
    run = settings_for(load_experiment("tiny", experiments), "alpha", judge="none")
    run_trait(run)
    sel = load_selection(run)
    assert sel.summary["judge"] == "none"
    assert sel.kept == {p: list(range(6)) for p in ("pos", "neg")}


def test_a_given_judge_is_named_in_the_key_and_a_non_judge_is_refused(experiments: Path) -> None:
    from tlextract.stages.judge import judge_key

    exp = load_experiment("tiny", experiments)
    given, local = (
        _settings(experiments, FakeJudge(lambda p: Score(1.0))),
        settings_for(exp, "alpha", judge="local"),
    )
    assert given.judge["name"] == "fake" and judge_key(given, "r") != judge_key(local, "r")
    with pytest.raises(TLExtractError, match="judge=.*needs a name"):
        settings_for(exp, "alpha", judge=object())
