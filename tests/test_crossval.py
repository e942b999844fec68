"""Nested cross-validation, bootstrap intervals and nulls on planted data: a known direction plus
noise, where the true figures are known in closed form."""

from __future__ import annotations

import math
from statistics import mean

import pytest
import torch

from tlextract.cli.main import main
from tlextract.config import load_experiment
from tlextract.evaluation.crossval import cross_validate, load_crossval, verdict
from tlextract.evaluation.heldout import load_kept
from tlextract.ops.bootstrap import Interval, bootstrap, weighted_figures
from tlextract.ops.directions import mean_diff
from tlextract.ops.folds import (
    fold_of,
    nested,
    pick_layer,
    random_direction_scores,
    shuffled_labels,
)
from tlextract.ops.metrics import auroc, project, split_indices
from tlextract.settings import report_dir, settings_for
from tlextract.stages.run import run_trait


def phi(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def planted(seed: int, n: int = 40, layers: int = 12, d: int = 8, delta: float = 1.0):
    """n pos and n neg rows (row i and n + i share example i); pos = neg + delta along e0 at
    every layer, unit-variance noise everywhere."""
    gen = torch.Generator().manual_seed(seed)
    shift = torch.zeros(d)
    shift[0] = delta
    pos = torch.randn(n, layers, d, generator=gen) + shift
    neg = torch.randn(n, layers, d, generator=gen)
    y = torch.tensor([True] * n + [False] * n)
    return torch.cat([pos, neg]), y, list(range(n)) * 2


def true_auroc(direction: torch.Tensor, delta: float = 1.0) -> float:
    """AUROC on fresh data of projections on ``direction``: N(delta cos, 1) vs N(0, 1)."""
    cos = float(direction[0] / direction.norm())
    return phi(delta * cos / math.sqrt(2))


def _auroc(z: torch.Tensor, y: torch.Tensor) -> float:
    return float(auroc(z[y][:, None], z[~y][:, None])[0])


def test_folds_keep_an_example_whole_and_are_balanced():
    groups = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7]
    fold = fold_of(groups, 3, seed=1)
    for g in set(groups):
        assert len({int(f) for f, h in zip(fold, groups, strict=True) if h == g}) == 1
    per_fold = [
        len({g for g, f in zip(groups, fold.tolist(), strict=True) if f == k}) for k in range(3)
    ]
    assert max(per_fold) - min(per_fold) <= 1
    assert fold_of(groups, 3, seed=1).tolist() == fold.tolist()


def test_nested_choice_is_unbiased_where_same_split_choice_is_not():
    """Over seeds, the nested figure matches the true AUROC of the vectors it scored; picking the
    best of 12 layers on the split that is then reported overstates it."""
    fit = mean_diff
    cv_bias, old_bias = [], []
    for seed in range(30):
        acts, y, groups = planted(seed)
        fold = fold_of(groups, 5, seed)
        result = nested(acts, y, fold, fit)
        truth = sum(
            true_auroc(v) * int((fold == f).sum()) for f, v in enumerate(result.directions)
        ) / len(y)
        cv_bias.append(_auroc(result.scores, y) - truth)
        # The old way: one 25% split, the best layer picked on the scored split.
        _, test_ids = split_indices(40, 0.25, seed)
        test = torch.isin(torch.tensor(groups), test_ids)
        vectors = fit(acts[~test & y], acts[~test & ~y])
        proj = project(acts, vectors)
        per_layer = auroc(proj[test & y], proj[test & ~y])
        best = int(per_layer.argmax())
        old_bias.append(float(per_layer[best]) - true_auroc(vectors[best]))
    assert abs(mean(cv_bias)) < 0.03
    assert mean(old_bias) > 0.08
    assert mean(old_bias) > mean(cv_bias) + 0.08


def test_nested_never_uses_the_scored_fold_to_choose():
    """Rewriting the held-out fold's activations cannot change the layer chosen for it."""
    acts, y, groups = planted(0)
    fold = fold_of(groups, 5, 0)
    before = nested(acts, y, fold, mean_diff).columns[0]
    scrambled = acts.clone()
    scrambled[fold == 0] = torch.randn_like(scrambled[fold == 0]) * 10
    assert nested(scrambled, y, fold, mean_diff).columns[0] == before


@pytest.mark.parametrize("delta", [0.5, 1.0])
def test_bootstrap_intervals_cover_the_planted_value_at_about_the_stated_rate(delta):
    """Scores N(delta, 1) vs N(0, 1), 50 + 50 paired by example: AUROC = Phi(delta / sqrt 2),
    Cohen's d = delta. 95% intervals over 200 seeds cover them 88-99% of the time."""
    truth = {"auroc": phi(delta / math.sqrt(2)), "cohens_d": delta}
    covered = {name: 0 for name in truth}
    runs = 200
    for seed in range(runs):
        gen = torch.Generator().manual_seed(1000 + seed)
        pos, neg = torch.randn(50, generator=gen) + delta, torch.randn(50, generator=gen)
        figures = bootstrap(pos, neg, list(range(50)), list(range(50)), n_boot=500, seed=seed)
        for name, value in truth.items():
            covered[name] += figures[name].covers(value)
    for name, count in covered.items():
        assert 0.88 <= count / runs <= 0.99, (name, count / runs)


def test_weighted_figures_equal_the_figures_of_duplicated_rows():
    gen = torch.Generator().manual_seed(0)
    pos, neg = torch.randn(6, generator=gen) + 0.5, torch.randn(5, generator=gen)
    w_pos, w_neg = torch.tensor([[2, 0, 1, 1, 3, 0]]), torch.tensor([[1, 1, 0, 2, 1]])
    dup_pos, dup_neg = pos.repeat_interleave(w_pos[0]), neg.repeat_interleave(w_neg[0])
    got = weighted_figures(pos, neg, w_pos, w_neg)
    assert float(got["auroc"][0]) == pytest.approx(
        float(auroc(dup_pos[:, None], dup_neg[:, None])[0])
    )
    pooled = ((dup_pos - dup_pos.mean()).pow(2).sum() + (dup_neg - dup_neg.mean()).pow(2).sum()) / (
        len(dup_pos) + len(dup_neg) - 2
    )
    assert float(got["cohens_d"][0]) == pytest.approx(
        float((dup_pos.mean() - dup_neg.mean()) / pooled.sqrt()), rel=1e-5
    )
    accuracy = ((dup_pos > 0).float().mean() + (dup_neg <= 0).float().mean()) / 2
    assert float(got["accuracy"][0]) == pytest.approx(float(accuracy))


def test_bootstrap_moves_an_example_as_a_whole():
    """Two rows of one example always come and go together: if the pos row of example 0 is the
    only pos, every resample has its neg partner too (no resample drops one side of it)."""
    figures = bootstrap(
        torch.tensor([1.0, 2.0]), torch.tensor([0.0, -1.0]), [0, 1], [0, 1], n_boot=200
    )
    assert figures["auroc"] == Interval(1.0, 1.0, 1.0)


def test_shuffled_labels_give_chance_and_a_planted_vector_does_not():
    real, null = [], []
    for seed in range(20):
        acts, y, groups = planted(seed, delta=1.5)
        fold = fold_of(groups, 5, seed)
        fake = shuffled_labels(y, groups, fold, seed)
        # Half of each fold's examples swapped: the pseudo-labels carry no trait.
        for f in range(5):
            members = (fold == f) & y
            assert abs(int((fake[members] == y[members]).sum()) - int(members.sum()) / 2) <= 0.5
        real.append(_auroc(nested(acts, y, fold, mean_diff).scores, y))
        null.append(_auroc(nested(acts, fake, fold, mean_diff).scores, y))
    assert abs(mean(null) - 0.5) < 0.06
    assert mean(real) > 0.8


def test_random_direction_scores_near_chance_on_isotropic_noise():
    values = []
    for seed in range(20):
        acts, y, groups = planted(seed, d=64, delta=2.0)
        fold = fold_of(groups, 5, seed)
        z = random_direction_scores(acts, y, fold, [0] * 5, seed)
        assert not z.isnan().any()
        values.append(_auroc(z, y))
    # Oriented on training data, so a hair above 0.5: e0 is 1 of 64 dimensions.
    assert 0.45 < mean(values) < 0.62


def test_trait_cross_validation_scores_every_kept_example_once_and_is_read_back(
    experiments, tiny_model
) -> None:
    run = settings_for(load_experiment("tiny", experiments), "alpha", n_examples=10)
    run_trait(run, get_model=lambda: tiny_model)
    cv = cross_validate(run, ["mean_diff", "probe"], folds=5, n_boot=200)
    kept = load_kept(run).acts
    assert cv.n == {"pos": len(kept.pos_index), "neg": len(kept.neg_index)}
    assert [s.name for s in cv.scored] == [
        "mean_diff", "random direction", "shuffled labels", "probe", "length", "bag_of_words",
    ]  # fmt: skip
    assert all(len(s.layers) == 5 for s in cv.scored if s.kind == "method")
    assert cv.layer["mean_diff"] in kept.layers
    assert cv.beats_baseline["mean_diff"] == cv.get("mean_diff").auroc.above(
        cv.get(cv.best_baseline).auroc
    )
    path = report_dir(run) / "crossval.json"
    assert load_crossval(path) == cv
    stamp = path.stat().st_mtime_ns
    assert cross_validate(run, ["mean_diff", "probe"], folds=5, n_boot=200) == cv
    assert path.stat().st_mtime_ns == stamp  # read back, not recomputed
    assert verdict(cv, "mean_diff") in (report_dir(run) / "crossval.md").read_text()
    assert cross_validate(run, ["mean_diff"], folds=4, n_boot=200).folds == 4


def test_a_subset_of_methods_is_read_from_a_saved_superset_and_equals_its_own_computation(
    experiments, tiny_model
) -> None:
    run = settings_for(load_experiment("tiny", experiments), "alpha", n_examples=10)
    run_trait(run, get_model=lambda: tiny_model)
    full = cross_validate(run, ["mean_diff", "probe"], folds=5, n_boot=200)
    path = report_dir(run) / "crossval.json"
    stamp = path.stat().st_mtime_ns
    alone = cross_validate(run, ["mean_diff"], folds=5, n_boot=200)
    assert path.stat().st_mtime_ns == stamp  # read from the report's file, which keeps probe
    assert [s.name for s in alone.scored] == [
        "mean_diff", "random direction", "shuffled labels", "length", "bag_of_words",
    ]  # fmt: skip
    path.unlink()
    assert cross_validate(run, ["mean_diff"], folds=5, n_boot=200) == alone  # computed alone
    assert cross_validate(run, ["mean_diff", "probe"], folds=5, n_boot=200) == full


def test_per_layer_auroc_matches_a_direct_out_of_fold_computation() -> None:
    """The layer to use comes from out-of-fold scores at every layer: recompute one layer by
    hand (fit on the other folds, standardise by the training rows) and compare."""
    acts, y, groups = planted(3, layers=4)
    fold = fold_of(groups, 5, 3)
    result = nested(acts, y, fold, mean_diff)
    layer = 2
    z = torch.empty(len(y))
    for f in range(5):
        test = fold == f
        v = acts[~test & y, layer].mean(0) - acts[~test & ~y, layer].mean(0)
        proj = acts[:, layer] @ (v / v.norm())
        tp, tn = proj[~test & y], proj[~test & ~y]
        mid = (tp.mean() + tn.mean()) / 2
        sd = (((tp - tp.mean()) ** 2).sum() + ((tn - tn.mean()) ** 2).sum()) / (
            len(tp) + len(tn) - 2
        )
        z[test] = (proj[test] - mid) / sd.sqrt()
    assert torch.allclose(result.per_layer[:, layer], z, atol=1e-4)


def test_a_run_ends_with_its_cross_validated_result_and_the_next_commands(
    experiments, capsys
) -> None:
    base = ["--experiment", "tiny", "--experiments-dir", str(experiments), "--traits", "alpha"]
    assert main(["run", *base]) == 0
    out = capsys.readouterr().out
    run = settings_for(load_experiment("tiny", experiments), "alpha")
    cv = load_crossval(report_dir(run) / "crossval.json")
    assert f"use layer {cv.layer['mean_diff']}" in out
    assert f"AUROC {cv.get('mean_diff').auroc}" in out  # the saved figures, with intervals
    assert verdict(cv, "mean_diff") in out
    assert "next: make report trait=alpha experiment=tiny" in out
    assert "python -m tlextract monitor --experiment tiny --traits alpha" in out
    # Too few examples for 5 folds: the run still succeeds and says why there is no figure.
    assert main(["run", *base, "--n-examples", "4"]) == 0
    assert "no cross-validated figures: cross-validation: 5 folds need" in capsys.readouterr().out


def test_pick_layer_is_auroc_then_cohens_d_then_the_lower_layer() -> None:
    # the one best-layer rule (every layer tlextract names comes from it)
    y = torch.tensor([True, True, False, False])
    weak = [1.0, 0.0, 0.5, -1.0]  # AUROC 0.75
    tight = [1.0, 2.0, 0.0, 0.5]  # AUROC 1
    wide = [3.0, 4.0, 0.0, 0.5]  # AUROC 1, larger d
    z = torch.tensor([weak, tight, wide, wide, [float("nan")] * 4]).T
    assert pick_layer(z, y) == 2  # AUROC tie -> larger d -> the lower of two equal layers
    assert pick_layer(z[:, [4, 0]], y) == 1  # NaN never wins
