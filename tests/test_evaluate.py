"""Held-out evaluation and reports: planted signals, independent recomputation, the split by
example index, cached reruns, report files, cosine matrices."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_experiment
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

import tlextract.evaluation.evaluate as evaluate
from tlextract.config import load_experiment
from tlextract.errors import TLExtractError
from tlextract.evaluation.evaluate import evaluate_held_out, evaluate_trait, load_evaluation
from tlextract.evaluation.heldout import KeptRun, kept_activations, split_examples
from tlextract.judge.keep import Selection
from tlextract.ops.methods import METHODS
from tlextract.ops.trait_vectors import TraitVectors
from tlextract.report.summary import build_report, cosine_matrix
from tlextract.settings import RunSettings, settings_for
from tlextract.stages.activations import Activations
from tlextract.stages.run import run_trait

pytestmark = pytest.mark.usefixtures("one_thread")

LAYERS = (3, 5, 7)
PLANTED = 5
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def planted(
    shift: float, n: int = 40, d: int = 16, layers: tuple[int, ...] = LAYERS, offset: float = 0.0
) -> Activations:
    """Gaussian noise; at block PLANTED only, pos is shifted by +shift and neg by -shift along
    the first axis (plus a common offset there, to move the class midpoint)."""
    g = torch.Generator().manual_seed(0)
    pos, neg = (
        torch.randn(n, len(layers), d, generator=g),
        torch.randn(n, len(layers), d, generator=g),
    )
    col = layers.index(PLANTED)
    pos[:, col, 0] += shift + offset
    neg[:, col, 0] += -shift + offset
    return Activations(pos, neg, list(range(n)), list(range(n)), layers, "resid_post", "synthetic")


def kept(run: RunSettings, acts: Activations, drop: dict[str, set[int]] | None = None) -> KeptRun:
    """``acts`` as ``run``'s, with a judge that keeps all but ``drop``."""
    kept = {
        p: [i for i in getattr(acts, f"{p}_index") if i not in (drop or {}).get(p, ())]
        for p in ("pos", "neg")
    }
    selection = Selection(kept=kept, judgments=[], summary={"judge": "fake"})
    return KeptRun(run, kept_activations(acts, selection), selection.summary["judge"])


def tiny_run(root: Path, trait: str = "alpha", variant: str = "instruction"):
    return settings_for(load_experiment("tiny", root), trait, variant=variant)


def test_planted_signal_gives_accuracy_one_at_the_planted_layer(experiments):
    ev = evaluate_held_out(kept(tiny_run(experiments), planted(shift=3.0)))
    assert ev.methods == list(METHODS) and ev.layers == list(LAYERS)
    assert ev.n_train == {"pos": 30, "neg": 30} and ev.n_test == {"pos": 10, "neg": 10}
    # pca_centered centres the paired differences and so, by design, cannot see a shift that
    # every pair shares, which is all this planted signal is (tests/test_methods.py covers it)
    for method in (m for m in METHODS if m != "pca_centered"):
        best = ev.best[method]
        assert best.layer == PLANTED, method
        assert best.accuracy == 1.0 and best.auroc == 1.0, method
        noise = [r for r in ev.rows if r.method == method and r.layer != PLANTED]
        assert all(r.auroc < 0.9 for r in noise), method


def test_metrics_equal_an_independent_recomputation(experiments):
    acts = planted(shift=0.4)
    ev = evaluate_held_out(kept(tiny_run(experiments), acts), methods=("mean_diff",))
    test = np.isin(np.arange(40), ev.held_out_examples)
    pos, neg = acts.pos.double().numpy(), acts.neg.double().numpy()
    for col, layer in enumerate(LAYERS):
        v = pos[~test, col].mean(0) - neg[~test, col].mean(0)
        unit = v / np.linalg.norm(v)
        tp, tn = pos[test, col] @ unit, neg[test, col] @ unit
        threshold = (pos[~test, col] @ unit).mean() / 2 + (neg[~test, col] @ unit).mean() / 2
        scores, labels = np.concatenate([tp, tn]), np.r_[np.ones(len(tp)), np.zeros(len(tn))]
        sd = np.sqrt(
            (tp.var(ddof=1) * (len(tp) - 1) + tn.var(ddof=1) * (len(tn) - 1))
            / (len(tp) + len(tn) - 2)
        )
        [row] = [r for r in ev.rows if r.layer == layer]
        assert row.auroc == pytest.approx(roc_auc_score(labels, scores), abs=1e-6)
        assert row.accuracy == pytest.approx(
            balanced_accuracy_score(labels, scores > threshold), abs=1e-6
        )
        assert row.cohens_d == pytest.approx((tp.mean() - tn.mean()) / sd, rel=1e-4)
        assert row.gap == pytest.approx(tp.mean() - tn.mean(), rel=1e-4, abs=1e-6)
        if layer == ev.best["mean_diff"].layer:
            held = ev.held_out["mean_diff"]
            np.testing.assert_allclose(held.pos, tp, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(held.neg, tn, rtol=1e-4, atol=1e-5)
            assert held.threshold == pytest.approx(threshold, rel=1e-4, abs=1e-6)
            assert roc_auc_score(labels, np.r_[held.pos, held.neg]) == pytest.approx(row.auroc)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("fraction", [0.2, 0.5])
def test_split_never_puts_an_example_on_both_sides(seed, fraction):
    # empty responses leave gaps, on one side only
    pos_index = [i for i in range(20) if i != 3]
    neg_index = [i for i in range(20) if i not in (7, 11)]
    split = split_examples(pos_index, neg_index, fraction, seed)
    side = {
        name: {index[r] for r in rows}
        for name, index, rows in (
            ("pos_train", pos_index, split.pos_train),
            ("pos_test", pos_index, split.pos_test),
            ("neg_train", neg_index, split.neg_train),
            ("neg_test", neg_index, split.neg_test),
        )
    }
    train, test = side["pos_train"] | side["neg_train"], side["pos_test"] | side["neg_test"]
    assert not train & test
    assert test == split.held_out and train | test == set(range(20))
    assert sorted(split.pos_train + split.pos_test) == list(range(len(pos_index)))
    assert sorted(split.neg_train + split.neg_test) == list(range(len(neg_index)))
    assert split == split_examples(pos_index, neg_index, fraction, seed)


def test_only_examples_the_judge_kept_are_evaluated(experiments):
    drop = {"pos": {0, 1, 2}, "neg": {5}}
    ev = evaluate_held_out(
        kept(tiny_run(experiments), planted(shift=3.0), drop), methods=("mean_diff",)
    )
    assert ev.judge == "fake"
    assert {p: ev.n_train[p] + ev.n_test[p] for p in ("pos", "neg")} == {"pos": 37, "neg": 39}
    assert len(ev.held_out["mean_diff"].pos) == ev.n_test["pos"]
    assert set(ev.held_out_examples) <= set(range(40)) - (drop["pos"] & drop["neg"])


def test_cross_evaluate_scores_on_the_other_variants_held_out_rows(experiments):
    # same direction, shifted midpoint, fewer layers: the direction transfers, the threshold not
    natural = planted(shift=3.0, layers=(5, 7), offset=10.0)
    instruction = kept(tiny_run(experiments), planted(shift=3.0))
    natural_run = kept(tiny_run(experiments, variant="natural"), natural)
    cross = evaluate_held_out(instruction, natural_run, methods=("mean_diff", "probe"))
    own = evaluate_held_out(natural_run, methods=("mean_diff", "probe"))
    assert cross.is_cross and not own.is_cross
    assert (cross.train_variant, cross.variant) == ("instruction", "natural")
    assert cross.layers == [5, 7] and cross.held_out_examples == own.held_out_examples
    assert cross.n_test == own.n_test
    for method in ("mean_diff", "probe"):
        assert cross.best[method].layer == PLANTED and cross.best[method].auroc == 1.0
        assert cross.best[method].accuracy == 0.5  # the instruction threshold is far off


def test_bad_requests_fail_before_loading_anything(experiments):
    run = tiny_run(experiments)  # nothing generated: loading would fail differently
    with pytest.raises(TLExtractError, match="valid methods"):
        evaluate_trait(run, methods=("mean_diff", "nope"))


@pytest.fixture(scope="module")
def tiny_experiment(tmp_path_factory):
    """The tiny experiment with alpha and beta extracted (instruction variant only)."""
    root = tmp_path_factory.mktemp("experiments")
    write_experiment(root)
    for trait in ("alpha", "beta"):
        run_trait(tiny_run(root, trait))
    return load_experiment("tiny", root)


def test_report_writes_every_file_and_a_rerun_skips(tiny_experiment, monkeypatch, caplog):
    methods = ("mean_diff", "probe")
    summary = build_report(tiny_experiment, variants=("instruction", "natural"), methods=methods)
    first = {}
    assert summary == tiny_experiment.path / "report" / "summary.md"
    for trait in ("alpha", "beta"):
        out = tiny_experiment.path / trait / "extraction" / "report"
        for name in ("metrics_by_layer.png", "projections.png"):
            data = (out / name).read_bytes()
            assert data.startswith(PNG_MAGIC) and len(data) > 10_000
        metrics = json.loads((out / "metrics.json").read_text())
        first[trait] = load_evaluation(out / "metrics.json")
        assert metrics["methods"] == list(methods) and len(metrics["rows"]) == 2 * 3
        assert metrics["n_test"] == {"pos": 2, "neg": 2}  # round(6 * 0.25) held-out examples
        assert "**best**" in (out / "metrics.md").read_text()
        lens = json.loads((out / "vector_tokens.json").read_text())  # tests/test_vector_tokens.py
        layer = json.loads((out / "crossval.json").read_text())["layer"]["mean_diff"]
        assert lens["layer"] == layer and len(lens["promoted"]) == 10
    text = summary.read_text()
    assert "| alpha | instruction | none | 6/6 | 2/2 |" in text
    assert "| beta | instruction | none | 6/6 | 2/2 |" in text
    assert "no activations or judgments for these settings: alpha (natural)" in text
    [png] = (tiny_experiment.path / "report").glob("cosine_instruction_layer*.png")
    assert png.read_bytes().startswith(PNG_MAGIC) and png.name in text

    def refit(*args, **kwargs):
        raise AssertionError("an up-to-date evaluation was recomputed")

    monkeypatch.setattr(evaluate, "run_method", refit)
    caplog.clear()
    caplog.set_level(logging.INFO, logger="tlextract")
    for trait in ("alpha", "beta"):
        again = evaluate_trait(tiny_run(tiny_experiment.path.parent, trait), methods=methods)
        assert again.best == {m: first[trait].best[m] for m in methods}
    assert caplog.text.count("evaluation: up to date, skipped") == 2
    with pytest.raises(AssertionError, match="recomputed"):  # other methods: a new fingerprint
        evaluate_trait(tiny_run(tiny_experiment.path.parent), methods=("mean_diff",))


def test_cosine_matrix_is_symmetric_with_ones_on_the_diagonal(tiny_experiment):
    cm = cosine_matrix(tiny_experiment, layer=1)
    m = torch.tensor(cm.matrix, dtype=torch.float64)
    assert cm.traits == ["alpha", "beta"] and m.shape == (2, 2)
    torch.testing.assert_close(m, m.T)
    torch.testing.assert_close(m.diagonal(), torch.ones(2, dtype=torch.float64))
    a, b = (
        TraitVectors.load(tiny_experiment.path / t / "extraction" / "vectors" / "mean_diff.pt")[1]
        for t in cm.traits
    )
    assert m[0, 1].item() == pytest.approx(torch.cosine_similarity(a, b, dim=0).item(), abs=1e-5)
    assert json.loads(cm.json.read_text())["matrix"] == cm.matrix
    assert cm.png.read_bytes().startswith(PNG_MAGIC)
    assert cm.hook_name == "blocks.1.hook_resid_post"
