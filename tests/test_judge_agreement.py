"""Judge agreement: the scores and missing counts equal the judge's own scoring rule, and the
AUROC equals sklearn's on those scores."""

from __future__ import annotations

import pytest
from sklearn.metrics import roc_auc_score

from tlextract.judge.agreement import measure
from tlextract.judge.base import fill_prompt
from tlextract.judge.local import LocalJudge

pytestmark = pytest.mark.usefixtures("one_thread")
EVAL = "Rate it.\nQuestion: {question}\nAnswer: {answer}\nScore:"


def test_agreement_matches_the_judges_own_scores(tiny_model) -> None:
    rows = [
        {"polarity": pol, "question": f"question {i}", "response": f"{pol} answer number {i}",
         "n_response_tokens": 4}
        for pol in ("pos", "neg") for i in range(5)
    ]  # fmt: skip
    rows.append({**rows[0], "n_response_tokens": 0, "response": ""})  # empty: not judged
    # tiny-random spreads its mass over the vocabulary: a low min_mass keeps some, not all
    masses = (
        LocalJudge(tiny_model, min_mass=0.0)
        .number_probs([fill_prompt(EVAL, r["question"], r["response"]) for r in rows[:-1]])
        .sum(-1)
    )
    low, high = masses.sort().values[4:6].tolist()
    min_mass = (low + high) / 2  # half the rows fall short; none sits on the boundary
    judge = LocalJudge(tiny_model, min_mass=min_mass)
    got = measure(judge, EVAL, rows, "t", "instruction")
    scores = judge.score([fill_prompt(EVAL, r["question"], r["response"]) for r in rows[:-1]])
    assert got.n == {"pos": 5, "neg": 5}
    pairs = list(zip(rows[:-1], scores, strict=True))
    missing = {p: sum(s.missing for r, s in pairs if r["polarity"] == p) for p in ("pos", "neg")}
    assert got.missing == missing and 0 < sum(missing.values()) < 10
    kept = [
        (r["polarity"] == "pos", s.value)
        for r, s in zip(rows[:-1], scores, strict=True)
        if not s.missing
    ]
    ref = roc_auc_score([label for label, _ in kept], [v for _, v in kept])
    assert got.auroc == pytest.approx(ref, abs=1e-6)
    every = LocalJudge(tiny_model, min_mass=0.0).score(
        [fill_prompt(EVAL, r["question"], r["response"]) for r in rows[:-1]]
    )
    ref_all = roc_auc_score([r["polarity"] == "pos" for r in rows[:-1]], [s.value for s in every])
    assert got.auroc_all == pytest.approx(ref_all, abs=1e-6)
