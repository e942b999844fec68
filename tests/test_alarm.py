"""The alarm at a chosen false-alarm rate, on planted token data: the rate holds on fresh neutral
text, a planted signal is found at its layer, the window and the quantile rule recomputed by
hand; and the shipped neutral corpus."""

from __future__ import annotations

import pytest
import torch

from tlextract.errors import TLExtractError
from tlextract.monitoring.alarm import (
    Formulation,
    TokenData,
    fit_alarm,
    measure,
    running_mean,
    scores,
    threshold_at_rate,
)
from tlextract.ops.bootstrap import ratio_interval
from tlextract.ops.neutral import NEUTRAL_TEXTS, corpus_split, neutral_corpus

D, LAYERS, SIGNAL_LAYER = 16, [0, 1, 2], 1


def _texts(g: torch.Generator, n: int, shift: torch.Tensor | None = None) -> list[torch.Tensor]:
    """n texts of 10-30 tokens of standard normal noise at every layer, ``shift`` added to each
    token at SIGNAL_LAYER (the planted per-token signal)."""
    out = []
    for _ in range(n):
        x = torch.randn(int(torch.randint(10, 31, (1,), generator=g)), len(LAYERS), D, generator=g)
        if shift is not None:
            x[:, SIGNAL_LAYER] += shift
        out.append(x)
    return out


def _planted(seed: int = 0, strength: float = 3.0, n: int = 40) -> tuple[TokenData, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    u = torch.zeros(D)
    u[0] = 1.0
    pos, neg = _texts(g, n, strength * u), _texts(g, n, -0.0 * u)
    data = TokenData(
        layers=LAYERS,
        pooled_pos=torch.stack([t.mean(0) for t in pos]),
        pooled_neg=torch.stack([t.mean(0) for t in neg]),
        pos_index=list(range(n)),
        neg_index=list(range(n)),
        pos_tokens=pos,
        neg_tokens=neg,
        neutral_cal=_texts(g, 150),
        neutral_test=_texts(g, 150),
    )
    return data, u


def test_threshold_leaves_at_most_the_rate_above() -> None:
    values = torch.arange(100.0)  # 0..99
    assert threshold_at_rate(values, 0.05) == 94.0  # 95..99 above: exactly 5
    assert threshold_at_rate(values, 0.0) == 99.0
    assert float((values > threshold_at_rate(values, 0.123)).float().mean()) <= 0.123
    with pytest.raises(TLExtractError, match="needs neutral tokens"):
        threshold_at_rate(torch.tensor([]), 0.05)


def test_running_mean_matches_a_loop() -> None:
    x = torch.randn(9, 2, generator=torch.Generator().manual_seed(1))
    got = running_mean(x, 3)
    for t in range(9):
        assert torch.allclose(got[t], x[max(0, t - 2) : t + 1].mean(0))
    assert torch.equal(running_mean(x, 1), x)


def test_planted_signal_is_found_at_the_requested_false_alarm_rate() -> None:
    data, _ = _planted()
    for rate in (0.05, 0.2):
        fig = measure(data, Formulation(window=1), rate=rate)
        assert fig.false_alarm.covers(rate)  # held-out neutral text, within its interval
        assert fig.layers == [SIGNAL_LAYER] * 5  # its own CV finds the planted layer
        assert fig.tpr.low > 0.8  # a 3-sigma shift: most planted tokens fire
        assert fig.neg_rate.value < 2 * rate
        alarm = fit_alarm(data, "t", ["h0", "h1", "h2"], fig)
        assert alarm.layer == SIGNAL_LAYER and alarm.hook_name == "h1"
        # Fresh neutral text, drawn after everything was fitted: the rate holds there too.
        fresh = _texts(torch.Generator().manual_seed(99), 300)
        s = scores(fresh, torch.stack([alarm.unit_tensor()] * 3), 1)
        hit = [int((t[:, SIGNAL_LAYER] > alarm.threshold).sum()) for t in s]
        measured = ratio_interval(hit, [len(t) for t in s])
        assert alarm.false_alarm.covers(rate) and alarm.false_alarm.covers(measured.value)


def test_a_window_averages_noise_away_and_keeps_a_steady_signal() -> None:
    # Seed 1: on seed 0 the held-out rate of window 8 falls 2 sigma high (7.2% [5.2, 9.9]); on
    # seeds 1-6 the intervals cover 5% (a 95% interval misses one draw in twenty).
    data, _ = _planted(seed=1, strength=1.0)
    one, eight = (measure(data, Formulation(window=w)) for w in (1, 8))
    assert eight.tpr.value > one.tpr.value + 0.2  # a weak steady shift shows after averaging
    assert eight.false_alarm.covers(0.05)


def test_no_signal_gives_hits_at_the_false_alarm_rate_only() -> None:
    data, _ = _planted(strength=0.0)
    fig = measure(data, Formulation(layer=SIGNAL_LAYER))
    assert fig.tpr.value < 0.12 and fig.false_alarm.covers(0.05)


def test_alarm_marks_answer_tokens_with_the_window_over_answers_only() -> None:
    data, _ = _planted()
    alarm = fit_alarm(data, "t", ["h0", "h1", "h2"], measure(data, Formulation(window=2)))
    cut = alarm.threshold
    # prompt tokens never fire and never enter the window
    flags = alarm.above([1e9, cut + 1, cut - 0.5, cut - 3], [True, False, False, False])
    assert flags == [False, True, True, False]  # means: cut+1, cut+0.25, cut-1.75


def test_bad_rates_and_layers_are_refused() -> None:
    data, _ = _planted(n=10)
    with pytest.raises(TLExtractError, match="between 0 and 1"):
        measure(data, Formulation(), rate=1.5)
    with pytest.raises(TLExtractError, match="no layer 7"):
        measure(data, Formulation(layer=7))


def test_the_shipped_corpus_is_large_disjoint_halves_and_not_the_kl_texts() -> None:
    corpus = neutral_corpus()
    cal, test = corpus_split()
    assert len(corpus) == 250 == len(set(corpus))
    assert len(cal) == len(test) == 125 and not set(cal) & set(test)
    assert not set(corpus) & set(NEUTRAL_TEXTS)
