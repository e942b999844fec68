"""The responses of one trait run ranked by their projection on the trait vector at the chosen
layer, and per-token scores for the most and least trait-like of them.

Ranking reads what the run saved: each kept response's pooled activation (the activations
stage) projected on the unit mean_diff vector. Per-token scores are not saved by the pipeline;
they come from one teacher-forced pass at the chosen layer only
(:func:`tlextract.ops.token_acts.answer_residuals`): token ``i``'s score is its residual at
``blocks.<layer>.hook_resid_post`` (or the vectors' hook) dotted with ``v / ||v||``, in
activation units, as ``monitor`` scores tokens.
"""

from __future__ import annotations

from typing import Any

from tlextract.evaluation.heldout import load_kept
from tlextract.model.decoding import Model
from tlextract.model.tokens import tokenizer_of
from tlextract.ops.steer import unit_direction
from tlextract.ops.token_acts import answer_residuals
from tlextract.ops.trait_vectors import TraitVectors
from tlextract.settings import RunSettings
from tlextract.stages.responses import load_responses
from tlextract.steering.sweep import pole_means

TOKEN_RESPONSES = 8  # per end of the ranking: the responses whose tokens are coloured
SNIPPET = 240  # characters of the other responses' text kept in the page


def _sig(x: float) -> float:
    """Six significant digits: the page stays small and a score reads back within 1e-5."""
    return float(f"{x:.6g}")


def ranked_responses(
    model: Model, run: RunSettings, vectors: TraitVectors, layer: int
) -> dict[str, Any]:
    """The kept responses, most trait-like first, each with its projection; the first and last
    :data:`TOKEN_RESPONSES` also with token ids, token texts and per-token scores."""
    hook, unit = unit_direction(model, vectors, layer)
    unit = unit.cpu()
    acts = load_kept(run).acts
    column = acts.layers.index(layer)
    projections = [
        (pol, i, float(p))
        for pol, x, index in (("pos", acts.pos, acts.pos_index), ("neg", acts.neg, acts.neg_index))
        for i, p in zip(index, (x[:, column].float() @ unit).tolist(), strict=True)
    ]
    projections.sort(key=lambda t: -t[2])
    by_key = {(r["polarity"], r["index"]): r for r in load_responses(run)[0]}
    n = len(projections)
    coloured = [k for k in range(n) if k < TOKEN_RESPONSES or k >= n - TOKEN_RESPONSES]
    rows = [by_key[projections[k][:2]] for k in coloured]
    residuals = answer_residuals(
        model, [r["prompt_ids"] for r in rows], [r["response_ids"] for r in rows], [hook]
    )
    tokenizer = tokenizer_of(model)
    out = []
    for rank, (pol, i, p) in enumerate(projections):
        row = by_key[(pol, i)]
        text = row["response"]
        item: dict[str, Any] = {"rank": rank, "polarity": pol, "index": i,
                                "projection": _sig(p), "question": row.get("question", ""),
                                "text": text[:SNIPPET]}  # fmt: skip
        if rank in coloured:
            resid = residuals[coloured.index(rank)][:, 0]
            ids = [int(t) for t in row["response_ids"]]
            item |= {"text": text, "token_ids": ids,
                     "tokens": [tokenizer.decode([t]) for t in ids],
                     "scores": [_sig(s) for s in (resid @ unit).tolist()]}  # fmt: skip
        out.append(item)
    return {"hook": hook, "unit_norm": "v / ||v|| (float32)", "responses": out,
            "poles": pole_means(run, layer, unit)}  # fmt: skip
