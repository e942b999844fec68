"""Extraction methods on synthetic activations with a known (planted) direction per layer."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.covariance import ledoit_wolf_shrinkage
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression

from tlextract.errors import TLExtractError
from tlextract.ops import methods
from tlextract.ops.methods import METHODS, get_method, run_method

NAMES = list(METHODS)
# pca_centered centres the paired differences, which removes a shift every pair shares: on
# planted() data (the same shift k*u in every pair) it cannot find u, by design. Tests that check
# recovery of such a shift run on the others; pca_centered has its own below.
SHARED_SHIFT = [name for name in NAMES if name != "pca_centered"]


def planted(
    seed: int = 0,
    n_pos: int = 40,
    n_neg: int = 40,
    layers: int = 3,
    d_model: int = 64,
    k: float = 5.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """pos = noise + k*u_l, neg = noise - k*u_l, with a different unit u_l at every layer."""
    g = torch.Generator().manual_seed(seed)
    u = F.normalize(torch.randn(layers, d_model, generator=g), dim=-1)
    pos = torch.randn(n_pos, layers, d_model, generator=g) + k * u
    neg = torch.randn(n_neg, layers, d_model, generator=g) - k * u
    return pos, neg, u


def cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.double(), b.double(), dim=-1)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return planted()


@pytest.fixture(scope="module")
def results(data) -> dict[str, torch.Tensor]:
    pos, neg, _ = data
    return {name: run_method(name, pos, neg, seed=0) for name in NAMES}


@pytest.mark.parametrize("name", SHARED_SHIFT)
def test_method_recovers_the_planted_direction_of_every_layer(name, data, results):
    _, _, u = data
    assert F.cosine_similarity(u[0], u[1], dim=0).abs() < 0.5  # layers really differ
    assert (cos(results[name], u) > 0.95).all(), cos(results[name], u)


@pytest.mark.parametrize("name", NAMES)
def test_method_returns_finite_float32_layer_by_d_model(name, data, results):
    pos, _, _ = data
    v = results[name]
    assert v.dtype == torch.float32
    assert v.shape == pos.shape[1:]
    assert torch.isfinite(v).all()


@pytest.mark.parametrize("name", SHARED_SHIFT)
def test_method_accepts_float64_and_bfloat16_input(name):
    pos, neg, u = planted(n_pos=30, n_neg=30, layers=2, d_model=32)
    for dtype in (torch.float64, torch.bfloat16):
        v = run_method(name, pos.to(dtype), neg.to(dtype))
        assert v.dtype == torch.float32
        assert (cos(v, u) > 0.9).all()


@pytest.mark.parametrize("name", NAMES)
def test_method_is_deterministic_for_a_seed(name, data, results):
    pos, neg, _ = data
    assert torch.equal(run_method(name, pos, neg, seed=0), results[name])


def test_only_mean_diff_keeps_its_norm(results):
    # mean_diff: the shift between the classes, 2k along u plus noise
    assert results["mean_diff"].norm(dim=-1).min() > 9.0
    for name in NAMES:
        if name != "mean_diff":
            assert torch.allclose(results[name].norm(dim=-1), torch.ones(3), atol=1e-6)


@pytest.mark.parametrize("name", SHARED_SHIFT)
def test_positives_project_higher_and_swapping_classes_flips_the_direction(name, data, results):
    pos, neg, u = data
    v = results[name]
    assert ((pos.mean(0) - neg.mean(0)) * v).sum(-1).min() > 0
    flipped = run_method(name, neg, pos)
    assert (cos(flipped, -u) > 0.95).all()


@pytest.mark.parametrize("seed", range(1, 5))
def test_ica_sign_does_not_depend_on_the_seed(seed, data):
    pos, neg, u = data
    assert (cos(methods.ica(pos, neg, seed=seed), u) > 0.95).all()


def test_ica_picks_the_separating_component_not_a_bigger_one():
    # A strongly non-Gaussian nuisance source (bimodal, 3x the trait's amplitude) that does not
    # depend on the class, along r; the trait is along u.
    g = torch.Generator().manual_seed(1)
    n, d = 60, 32
    u, r = torch.linalg.qr(torch.randn(d, 2, generator=g))[0].T
    nuisance = (torch.randint(0, 2, (2 * n, 1), generator=g) * 2 - 1) * 12.0
    x = torch.randn(2 * n, d, generator=g) + nuisance * r
    x[:n] += 4 * u
    x[n:] -= 4 * u
    pos, neg = x[:n, None], x[n:, None]
    v = methods.ica(pos, neg)[0]
    assert F.cosine_similarity(v, u, dim=0) > 0.95
    assert F.cosine_similarity(v, r, dim=0).abs() < 0.2


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("n_pos,n_neg", [(1, 1), (1, 3), (2, 2)])
def test_method_is_finite_on_tiny_inputs(name, n_pos, n_neg):
    pos, neg, _ = planted(n_pos=n_pos, n_neg=n_neg, layers=2, d_model=16)
    v = run_method(name, pos, neg)
    assert v.shape == (2, 16) and v.dtype == torch.float32
    assert torch.isfinite(v).all()


@pytest.mark.parametrize("name", NAMES)
def test_method_is_finite_when_the_classes_are_identical(name):
    x = torch.ones(4, 2, 8)
    v = run_method(name, x, x.clone())
    assert torch.isfinite(v).all()


@pytest.mark.parametrize("name", SHARED_SHIFT)
def test_method_works_under_inference_mode(name):
    pos, neg, u = planted(n_pos=20, n_neg=20, layers=1, d_model=16)
    with torch.inference_mode():
        v = run_method(name, pos, neg)
    assert (cos(v, u) > 0.9).all()


def test_methods_reject_nan_activations():
    pos, neg, _ = planted(n_pos=4, n_neg=4, layers=1, d_model=8)
    pos[0, 0, 0] = float("nan")
    with pytest.raises(TLExtractError, match="NaN"):
        methods.probe(pos, neg)


def test_probe_matches_sklearn_logistic_regression():
    pos, neg, _ = planted(n_pos=30, n_neg=45, layers=2, d_model=24, k=1.0)
    l2 = 0.1
    v = methods.probe(pos, neg, l2=l2)
    for layer in range(2):
        p, q = pos[:, layer].double().numpy(), neg[:, layer].double().numpy()
        x = np.vstack([p, q])
        y = np.r_[np.ones(len(p)), np.zeros(len(q))]
        # the probe's documented preprocessing: centre, divide by the RMS within-class std
        within = np.vstack([p - p.mean(0), q - q.mean(0)])
        scale = np.sqrt((within**2).mean())
        clf = LogisticRegression(
            C=1.0 / (l2 * len(x)), class_weight="balanced", tol=1e-10, max_iter=10_000
        ).fit((x - x.mean(0)) / scale, y)
        w = clf.coef_[0]
        assert cos(v[layer], torch.from_numpy(w)) > 0.999


def repeng_pca(pos: np.ndarray, neg: np.ndarray, method: str) -> np.ndarray:
    """repeng's ``read_representations`` on one layer, re-derived (vgel/repeng, extract.py):
    rows interleaved positive, negative; ``pca_diff`` fits sklearn PCA to ``h[::2] - h[1::2]``,
    ``pca_center`` to ``h`` with each pair's mean subtracted from both of its rows."""
    h = np.empty((2 * len(pos), pos.shape[1]))
    h[::2], h[1::2] = pos, neg
    if method == "pca_diff":
        train = h[::2] - h[1::2]
    else:
        center = (h[::2] + h[1::2]) / 2
        train = h.copy()
        train[::2] -= center
        train[1::2] -= center
    return PCA(n_components=1, whiten=False).fit(train).components_[0]


def paired(seed: int = 0, n: int = 20, d_model: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs that share a shift along a (every difference is 4a plus its own part) and disagree
    along b (spread with std 3, mean near 0): the uncentred PCA sees 16 along a against about 9
    along b, the centred one only b. The two variants must give different answers here."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.linalg.qr(torch.randn(d_model, 2, generator=g, dtype=torch.float64))[0].T
    spread = torch.randn(n, 1, generator=g, dtype=torch.float64) * 3.0
    noise = torch.randn(2, n, d_model, generator=g, dtype=torch.float64) * 0.3
    pos = noise[0] + 2 * a + spread * b / 2
    neg = noise[1] - 2 * a - spread * b / 2
    return pos[:, None].float(), neg[:, None].float()


@pytest.mark.parametrize("d_model", [16, 48])  # more pairs than dimensions, and fewer
def test_pca_uncentered_is_repeng_pca_center(d_model):
    pos, neg, _ = planted(n_pos=25, n_neg=20, layers=2, d_model=d_model, k=1.0)
    v = methods.pca_uncentered(pos, neg)
    for layer in range(2):
        p, q = pos[:20, layer].double().numpy(), neg[:20, layer].double().numpy()  # 5 unused
        ref = repeng_pca(p, q, "pca_center")
        assert cos(v[layer], torch.from_numpy(ref)).abs() > 0.9999
        top = np.linalg.svd(p - q)[2][0]  # what its docstring says: uncentred differences
        assert cos(v[layer], torch.from_numpy(top)).abs() > 0.9999


@pytest.mark.parametrize("d_model", [16, 48])
def test_pca_centered_is_repeng_pca_diff(d_model):
    pos, neg, _ = planted(n_pos=20, n_neg=25, layers=2, d_model=d_model, k=1.0)
    v = methods.pca_centered(pos, neg)
    for layer in range(2):
        p, q = pos[:, layer].double().numpy(), neg[:20, layer].double().numpy()
        ref = repeng_pca(p, q, "pca_diff")
        assert cos(v[layer], torch.from_numpy(ref)).abs() > 0.9999


@pytest.mark.parametrize("seed", range(3))
def test_the_two_pca_variants_differ_where_pairs_share_a_shift(seed):
    pos, neg = paired(seed)
    p, q = pos[:, 0].double().numpy(), neg[:, 0].double().numpy()
    shared = torch.from_numpy(p.mean(0) - q.mean(0))
    uncentered, centered = methods.pca_uncentered(pos, neg)[0], methods.pca_centered(pos, neg)[0]
    # each matches its repeng counterpart, and they are not the same direction
    assert cos(uncentered, torch.from_numpy(repeng_pca(p, q, "pca_center"))).abs() > 0.9999
    assert cos(centered, torch.from_numpy(repeng_pca(p, q, "pca_diff"))).abs() > 0.9999
    assert cos(uncentered, centered).abs() < 0.5
    # the centred one loses the shift every pair shares; the uncentred one keeps it
    assert cos(centered, shared).abs() < cos(uncentered, shared).abs()
    # sign: positives project higher on average, for both
    for v in (uncentered, centered):
        assert (pos[:, 0] @ v).mean() >= (neg[:, 0] @ v).mean()


def test_pca_centered_recovers_a_direction_whose_strength_varies_by_pair():
    g = torch.Generator().manual_seed(4)
    n, d = 40, 32
    u = F.normalize(torch.randn(d, generator=g), dim=0)
    strength = 1.0 + 4.0 * torch.rand(n, 1, generator=g)  # always the same sign, varying size
    pos = torch.randn(n, d, generator=g) * 0.5 + strength * u
    neg = torch.randn(n, d, generator=g) * 0.5 - strength * u
    v = methods.pca_centered(pos[:, None], neg[:, None])[0]
    assert cos(v, u) > 0.95  # sign by the class means


@pytest.mark.parametrize("name", ["pca_uncentered", "pca_centered"])
def test_pca_methods_pair_by_position(name):
    pos, neg, _ = planted(n_pos=30, n_neg=20)
    fn = get_method(name)
    assert torch.allclose(fn(pos, neg), fn(pos[:20], neg), atol=1e-6)


def test_old_pca_diff_name_is_refused_with_both_new_names():
    pos, neg, _ = planted(n_pos=4, n_neg=4, layers=1, d_model=8)
    for call in (lambda: get_method("pca_diff"), lambda: run_method("pca_diff", pos, neg)):
        with pytest.raises(TLExtractError, match="pca_uncentered") as err:
            call()
        assert "pca_centered" in str(err.value) and "pca_center'" in str(err.value)
    assert "pca_diff" not in METHODS


def test_gradient_reaches_the_shrunk_lda_optimum():
    g = torch.Generator().manual_seed(3)
    layers, d, n = 2, 32, 25
    mix = torch.randn(layers, d, d, generator=g) * torch.linspace(0.1, 1.0, d)

    def noise(m: int) -> torch.Tensor:
        return torch.einsum("nld,lde->nle", torch.randn(m, layers, d, generator=g), mix)

    u = F.normalize(torch.randn(layers, d, generator=g), dim=-1)
    pos, neg = noise(n) + u, noise(n + 6) - u
    v = methods.gradient(pos, neg)
    for layer in range(layers):
        p, q = pos[:, layer].double().numpy(), neg[:, layer].double().numpy()
        within = np.vstack([p - p.mean(0), q - q.mean(0)])
        a = ledoit_wolf_shrinkage(within, assume_centered=True)
        s = within.T @ within / len(within)
        c = (1 - a) * s + a * np.trace(s) / d * np.eye(d)
        w = np.linalg.solve(c, p.mean(0) - q.mean(0))
        assert cos(v[layer], torch.from_numpy(w)) > 0.999
        assert cos(v[layer], u[layer]) < 0.95  # the optimum is not just the mean difference


def test_get_method_returns_registered_functions():
    assert list(METHODS) == [
        "mean_diff", "probe", "pca_uncentered", "pca_centered", "ica", "gradient"
    ]  # fmt: skip
    assert get_method("probe") is methods.probe


def test_get_method_lists_valid_names_for_an_unknown_one():
    with pytest.raises(TLExtractError, match="valid methods: mean_diff, probe"):
        get_method("lda")


def test_every_method_runs_with_just_pos_and_neg():
    pos, neg, _ = planted(n_pos=5, n_neg=5, layers=2, d_model=8)
    for name in NAMES:
        assert get_method(name)(pos, neg).shape == (2, 8)


@pytest.mark.parametrize("name", NAMES)
def test_every_method_takes_pos_neg_and_a_keyword_only_seed(name):
    params = list(inspect.signature(get_method(name)).parameters.values())
    assert [p.name for p in params[:2]] == ["pos", "neg"]
    assert all(p.kind is p.POSITIONAL_OR_KEYWORD for p in params[:2])
    seed = next(p for p in params if p.name == "seed")
    assert seed.kind is seed.KEYWORD_ONLY and seed.default == 0
    assert all(p.kind is p.KEYWORD_ONLY and p.default is not p.empty for p in params[2:])


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("seed", [0, 3])
def test_run_method_is_the_registered_call_with_that_seed(name, seed):
    pos, neg, _ = planted(n_pos=12, n_neg=10, layers=2, d_model=16)
    direct = get_method(name)(pos, neg, seed=seed)
    assert torch.equal(run_method(name, pos, neg, seed=seed), direct)
