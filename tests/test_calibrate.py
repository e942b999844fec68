"""Calibrated monitoring: the threshold on planted data, out-of-fold projections recomputed by
hand, false alarms measured on the tiny model, the pictures' marks and the ``monitor`` command."""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from tlextract.cli.main import main
from tlextract.config import load_experiment
from tlextract.errors import TLExtractError
from tlextract.evaluation.heldout import KeptRun
from tlextract.model.tokens import tokenize
from tlextract.monitoring.alarm_data import monitor_alarm
from tlextract.monitoring.calibrate import (
    Calibration,
    best_threshold,
    false_alarms,
    held_out_projections,
    neutral_token_scores,
)
from tlextract.ops.folds import fold_of
from tlextract.ops.monitor import Monitoring, TokenScores
from tlextract.ops.neutral import NEUTRAL_QUESTIONS, NEUTRAL_TEXTS
from tlextract.report.monitor_view import (
    above_threshold,
    heatmap_figure,
    token_html,
    write_monitoring,
)
from tlextract.settings import RunSettings, settings_for
from tlextract.stages.activations import Activations
from tlextract.traits import render_prompt

pytestmark = pytest.mark.usefixtures("one_thread")


# --- the threshold ---------------------------------------------------------------------------


def test_threshold_on_two_gaussians_is_the_bayes_cut() -> None:
    g = torch.Generator().manual_seed(0)
    pos = (torch.randn(20_000, generator=g, dtype=torch.float64) + 2).tolist()
    neg = torch.randn(20_000, generator=g, dtype=torch.float64).tolist()
    threshold, tpr, tnr = best_threshold(pos, neg)
    phi_1 = 0.5 * (1 + math.erf(1 / math.sqrt(2)))  # P(N(0,1) < 1) = 0.841
    assert threshold == pytest.approx(1.0, abs=0.1)
    assert tpr == pytest.approx(phi_1, abs=0.015) and tnr == pytest.approx(phi_1, abs=0.015)


def test_threshold_rules_on_small_cases() -> None:
    assert best_threshold([3.0, 4.0], [1.0, 2.0]) == (2.5, 1.0, 1.0)  # midpoint of the gap
    # Cuts 0.5 and 2.5 both give balanced accuracy 0.75: the lower one wins.
    assert best_threshold([1.0, 3.0], [0.0, 2.0]) == (0.5, 1.0, 0.5)
    # A reversed direction is not flipped: the best cut stays below chance.
    assert best_threshold([0.0, 1.0], [2.0, 3.0]) == (0.5, 0.5, 0.0)
    assert best_threshold([1.0], [1.0]) == (1.0, 0.0, 1.0)  # nothing to cut
    with pytest.raises(TLExtractError, match="pos and neg"):
        best_threshold([], [1.0])


# --- out-of-fold projections -----------------------------------------------------------------


def _planted(seed: int = 0) -> Activations:
    """20 examples, a few dropped on one side as a judge would; the trait lives at block 5
    only (block 3 is noise)."""
    g = torch.Generator().manual_seed(seed)
    d = 16
    direction = torch.randn(d, generator=g)
    direction /= direction.norm()
    pos_index = [i for i in range(20) if i not in (3, 11)]
    neg_index = [i for i in range(20) if i != 7]
    pos = torch.randn(len(pos_index), 2, d, generator=g)
    neg = torch.randn(len(neg_index), 2, d, generator=g)
    pos[:, 1] += 3 * direction
    acts = Activations(pos, neg, pos_index, neg_index, (3, 5), "resid_post", "planted")
    return acts


@pytest.fixture
def run(experiments: Path) -> RunSettings:
    return settings_for(load_experiment("tiny", experiments), "alpha")


def test_held_out_projections_equal_a_fit_without_each_rows_fold(run: RunSettings) -> None:
    acts = _planted()
    kept = KeptRun(run, acts, "none")
    pos, neg = held_out_projections(kept, 5, folds=4, seed=1)
    assert (len(pos), len(neg)) == (len(acts.pos_index), len(acts.neg_index))
    fold = fold_of([*acts.pos_index, *acts.neg_index], 4, 1).numpy()
    x = np.concatenate([acts.pos[:, 1].numpy(), acts.neg[:, 1].numpy()]).astype(np.float64)
    is_pos = np.arange(len(x)) < len(acts.pos_index)
    expected = []
    for row in range(len(x)):
        train = fold != fold[row]
        v = x[train & is_pos].mean(0) - x[train & ~is_pos].mean(0)
        expected.append(float(x[row] @ (v / np.linalg.norm(v))))
    np.testing.assert_allclose([*pos, *neg], expected, rtol=1e-4, atol=1e-4)
    # In-sample projections differ: a leak would have been seen.
    full = x[is_pos].mean(0) - x[~is_pos].mean(0)
    in_sample = x @ (full / np.linalg.norm(full))
    assert np.abs(in_sample - np.array(expected)).max() > 1e-2
    assert np.mean(pos) - np.mean(neg) > 2.0  # the planted gap of 3, seen out of fold


def test_held_out_projections_name_what_is_missing(run: RunSettings) -> None:
    kept = KeptRun(run, _planted(), "none")
    with pytest.raises(TLExtractError, match="no layer 4"):
        held_out_projections(kept, 4)
    with pytest.raises(TLExtractError, match="folds need at least"):
        held_out_projections(kept, 5, folds=50)


# --- neutral text on the tiny model ----------------------------------------------------------

NAME = "blocks.1.hook_resid_post"


def _unit(model, seed: int = 0) -> torch.Tensor:
    v = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(seed))
    return v / v.norm()


def test_neutral_scores_equal_run_with_cache_on_each_text_alone(tiny_model) -> None:
    unit = _unit(tiny_model)
    texts = NEUTRAL_TEXTS[:6]
    scores = neutral_token_scores(tiny_model, unit, NAME, "chat", texts, batch_size=4)
    assert len(scores) == len(texts)
    tok = tiny_model.tokenizer
    for i in (0, 3, 5):  # first batch (padded) and second batch
        question = NEUTRAL_QUESTIONS[i % len(NEUTRAL_QUESTIONS)]
        prompt = tokenize(tiny_model, [render_prompt(tok, "chat", "", question)], "chat")[0]
        answer = tok(texts[i], add_special_tokens=False)["input_ids"]
        _, cache = tiny_model.run_with_cache(
            torch.tensor([prompt + answer]), names_filter=NAME, return_type=None
        )
        expected = cache[NAME][0, len(prompt) :] @ unit
        assert len(scores[i]) == len(answer)
        torch.testing.assert_close(torch.tensor(scores[i]), expected, atol=1e-4, rtol=1e-4)


def test_false_alarm_rates_are_measured_on_the_neutral_scores(tiny_model) -> None:
    scores = neutral_token_scores(tiny_model, _unit(tiny_model, 1), NAME, "chat", NEUTRAL_TEXTS)
    flat = [s for text in scores for s in text]
    means = [float(np.mean(text)) for text in scores]
    assert false_alarms(scores, min(flat) - 1e-6) == (1.0, 1.0)
    assert false_alarms(scores, max(flat)) == (0.0, 0.0)
    cut = float(np.median(flat))
    tokens, texts = false_alarms(scores, cut)
    assert tokens == sum(s > cut for s in flat) / len(flat)
    assert texts == sum(m > cut for m in means) / len(means)
    assert 0.0 < tokens < 1.0


# --- marks in the pictures -------------------------------------------------------------------


def _calibration(trait: str, threshold: float) -> Calibration:
    return Calibration(trait, 1, NAME, threshold, 0.9, 0.8, 10, 12, 0.05, 0.0, 300, 24)


def _monitoring() -> Monitoring:
    """50 tokens (two heatmap rows), the first 5 the prompt; score = position for both traits."""
    n, n_prompt = 50, 5
    text = TokenScores(
        prompt="Hi",
        token_ids=list(range(n)),
        tokens=[f"t{i}" for i in range(n)],
        is_prompt=[i < n_prompt for i in range(n)],
        scores={"a": [float(i) for i in range(n)], "b": [float(-i) for i in range(n)]},
        stopped=True,
    )
    return Monitoring(["a", "b"], {"a": 1, "b": 1}, {"a": NAME, "b": NAME}, {}, [text])


def test_answer_tokens_above_the_threshold_are_marked() -> None:
    mon = _monitoring()
    text = mon.texts[0]
    thresholds = {"a": _calibration("a", 44.5)}
    assert above_threshold(text, "a", thresholds) == [i > 44.5 for i in range(50)]
    assert not any(above_threshold(text, "b", thresholds))  # no calibration for b
    # Prompt tokens are never marked, whatever their score.
    assert not any(above_threshold(text, "a", {"a": _calibration("a", -1.0)})[:5])

    fig = heatmap_figure(mon, 0, thresholds=thresholds)
    dots = [
        (row, [tuple(map(float, xy)) for xy in c.get_offsets()])
        for row, ax in enumerate(fig.axes[:2])
        for c in ax.collections
    ]
    assert dots == [(1, [(5.0, 0.0), (6.0, 0.0), (7.0, 0.0), (8.0, 0.0), (9.0, 0.0)])]
    title = fig.get_suptitle()
    assert thresholds["a"].describe() in title and "b: no calibration" in title
    assert "threshold 44.5 (held-out TPR 0.90, TNR 0.80)" in title
    assert "5.0% of tokens" in title
    assert not any(ax.collections for ax in heatmap_figure(mon, 0).axes[:2])  # [2]: colorbar


def test_page_and_json_carry_the_calibration(tmp_path: Path) -> None:
    mon = _monitoring()
    thresholds = {"a": _calibration("a", 44.5)}
    page = token_html(mon, "a", thresholds=thresholds)
    assert len(re.findall(r'class="answer above"', page)) == 5
    assert "Bold and underlined" in page and "false alarms on neutral text: 5.0%" in page
    assert 'class="answer above"' not in token_html(mon, "a")
    paths = write_monitoring(mon, tmp_path, "a", thresholds=thresholds)
    saved = json.loads(paths[0].read_text())
    assert saved["calibration"] == {"a": asdict(thresholds["a"])}
    assert len(re.findall(r'class="answer above"', paths[-1].read_text())) == 5


# --- the monitor command ---------------------------------------------------------------------


def test_cli_monitor_reports_its_alarms(tiny_model, experiments: Path, capsys) -> None:
    base = ["--experiment", "tiny", "--experiments-dir", str(experiments)]
    assert main(["run", *base]) == 0
    capsys.readouterr()
    monitor = ["monitor", *base, "--prompt", "Hello there", "--max-new-tokens", "5"]
    assert main([*monitor, "--folds", "3", "--false-alarm-rate", "0.1"]) == 0
    printed = capsys.readouterr().out
    out = experiments / "tiny" / "monitor"
    saved = json.loads((out / "calibration.json").read_text())
    assert set(saved) == {"alpha", "beta"}
    alpha = settings_for(load_experiment("tiny", experiments), "alpha")
    again = monitor_alarm(tiny_model, alpha, 0.1, folds=3)
    assert saved["alpha"] == json.loads(json.dumps(asdict(again)))
    assert again.figures.rate == 0.1 and again.describe() in printed

    watched = json.loads((out / "monitor.json").read_text())
    assert watched["calibration"] == saved
    assert watched["layers"]["alpha"] == again.layer  # watched where the alarm was set
    text = watched["texts"][0]
    above = sum(again.above(text["scores"]["alpha"], text["is_prompt"]))
    n = len(text["is_prompt"]) - sum(text["is_prompt"])
    assert f"answer 0: tokens above threshold: alpha {above}/{n}, beta " in printed

    # Too few examples for the folds: monitoring goes on, without thresholds.
    assert main([*monitor, "--folds", "50"]) == 0
    printed = capsys.readouterr().out
    assert "[alpha] no threshold:" in printed and "no thresholds" in printed
    assert json.loads((out / "calibration.json").read_text()) == {}
    assert main([*monitor, "--false-alarm-rate", "5"]) == 2
    assert "--false-alarm-rate 5.0: use a share between 0 and 1" in capsys.readouterr().err


def test_cli_alarm_compares_formulations(experiments: Path, capsys) -> None:
    base = ["--experiment", "tiny", "--experiments-dir", str(experiments)]
    assert main(["run", *base]) == 0
    capsys.readouterr()
    assert main(["alarm", *base, "--folds", "3", "--traits", "alpha"]) == 0
    printed = capsys.readouterr().out
    saved = json.loads((experiments / "tiny" / "monitor" / "alarm.json").read_text())
    rows = saved["formulations"]["alpha"]
    assert len(rows) == 6 and rows[0]["formulation"]["layer"] is not None
    assert saved["alarms"]["alpha"]["figures"]["formulation"]["window"] == 8
    assert "alarm: 1 traits ->" in printed
