"""The variants comparison: surface baselines on the evaluation's own split, transfers equal to
cross_evaluate, and the report section that shows them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import write_experiment
from sklearn.metrics import roc_auc_score

from tlextract.config import load_experiment
from tlextract.evaluation.evaluate import cross_evaluate, evaluate_trait
from tlextract.evaluation.heldout import load_kept
from tlextract.evaluation.variants import _score_baseline, split_baselines
from tlextract.report.summary import build_report
from tlextract.settings import settings_for
from tlextract.stages.responses import load_responses
from tlextract.stages.run import run_trait

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_baseline_score_orients_by_train_and_matches_sklearn(sign: float) -> None:
    g = torch.Generator().manual_seed(0)
    train_pos, train_neg = (
        sign * (torch.randn(20, 1, generator=g) + 2),
        torch.randn(20, 1, generator=g),
    )
    test_pos, test_neg = sign * (torch.randn(9, 1, generator=g) + 1), torch.randn(7, 1, generator=g)
    got = _score_baseline(train_pos, train_neg, test_pos, test_neg)
    labels = [1] * 9 + [0] * 7
    scores = sign * torch.cat([test_pos, test_neg])[:, 0]
    assert got.auroc == pytest.approx(roc_auc_score(labels, scores.numpy()), abs=1e-6)
    cut = float(train_pos.mean() + train_neg.mean()) / 2
    tpr = float(((test_pos - cut) * sign > 0).float().mean())
    tnr = float(((test_neg - cut) * sign <= 0).float().mean())
    assert got.accuracy == pytest.approx((tpr + tnr) / 2, abs=1e-6)


@pytest.fixture(scope="module")
def both_variants(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("experiments")
    write_experiment(root, n_examples=8)
    for variant in ("instruction", "natural"):
        run_trait(settings_for(load_experiment("tiny", root), "alpha", variant=variant))
    return root


def test_surface_baselines_see_planted_length_and_words(both_variants: Path) -> None:
    run = settings_for(load_experiment("tiny", both_variants), "alpha")
    responses, _ = load_responses(run)

    def planted(r: dict) -> dict:
        pos = r["polarity"] == "pos"
        text = "facts facts facts facts facts" if pos else "story"
        return {**r, "response": text, "n_response_tokens": 9 if pos else 2}

    length, words = split_baselines(load_kept(run).acts, [planted(r) for r in responses])
    assert (length.accuracy, length.auroc) == (1.0, 1.0)
    assert (words.accuracy, words.auroc) == (1.0, 1.0)


def test_report_compares_variants_with_transfers_equal_to_cross_evaluate(both_variants: Path):
    exp = load_experiment("tiny", both_variants)
    summary = build_report(
        exp, ["alpha"], variants=("instruction", "natural"), methods=("mean_diff",)
    ).read_text()
    assert "## Instruction vs natural elicitation (mean_diff)" in summary
    assert "| alpha | instruction | natural |" in summary
    [comparison] = json.loads((exp.path / "report" / "variants.json").read_text())
    runs = {v: settings_for(exp, "alpha", variant=v) for v in ("instruction", "natural")}
    for variant, figures in comparison["variants"].items():
        own = evaluate_trait(runs[variant], methods=("mean_diff",))
        assert figures["layer"] == own.best["mean_diff"].layer
        assert figures["n_test"] == own.n_test
    assert len(comparison["transfers"]) == 2
    for t in comparison["transfers"]:
        cross = cross_evaluate(runs[t["source"]], runs[t["target"]], ["mean_diff"])
        row = next(r for r in cross.rows if r.layer == t["layer"])
        assert (t["accuracy"], t["auroc"], t["cohens_d"]) == (row.accuracy, row.auroc, row.cohens_d)
        assert t["layer"] == comparison["variants"][t["source"]]["layer"]
