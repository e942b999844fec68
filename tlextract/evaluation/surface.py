"""Scores computed from the response text alone: the surface baselines a trait vector has to
beat (response length, bag of words), and the bag-of-words classifier that measures a steering
effect without a judge."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from sklearn.feature_extraction.text import CountVectorizer
from sklearn.linear_model import LogisticRegression
from torch import Tensor

from tlextract.errors import TLExtractError
from tlextract.ops.folds import standardize, standardize_oriented

BASELINES = ("length", "bag_of_words")


@runtime_checkable
class TextScorer(Protocol):
    """Anything that reads texts and says how likely each is to be pos."""

    def prob_pos(self, texts: Sequence[str]) -> list[float]: ...


class TextClassifier:
    """Bag-of-words logistic regression (word counts, L2, sklearn defaults): pos = 1."""

    def __init__(self, texts: Sequence[str], labels: Sequence[bool]):
        if len(set(labels)) != 2:
            raise TLExtractError("text classifier: needs pos and neg responses to train on.")
        self.words = CountVectorizer(lowercase=True)
        try:
            counts = self.words.fit_transform(list(texts))
        except ValueError:  # sklearn's "empty vocabulary": no word of 2+ letters in any text
            raise TLExtractError(
                f"text classifier: the {len(texts)} responses hold no words (e.g. one token each, "
                "or only punctuation); generate longer responses (generation.max_new_tokens)."
            ) from None
        self.model = LogisticRegression(max_iter=2000)
        self.model.fit(counts, [int(x) for x in labels])
        self.n_train = len(texts)

    def decision(self, texts: Sequence[str]) -> np.ndarray:
        """Log-odds of pos."""
        return np.asarray(self.model.decision_function(self.words.transform(list(texts))))

    def prob_pos(self, texts: Sequence[str]) -> list[float]:
        return [float(p) for p in self.model.predict_proba(self.words.transform(list(texts)))[:, 1]]


def _fold_scores(
    texts: Sequence[str], lengths: Sequence[int], y: Tensor, train: Tensor, kind: str
) -> Float[Tensor, " n_test"]:
    if kind == "length":
        raw = torch.tensor([float(n) for n in lengths])[:, None]
        # Longer is not "pos" by definition: the training folds say which way it points.
        return standardize_oriented(raw[train], y[train], raw[~train])[:, 0]
    rows = torch.arange(len(texts))
    clf = TextClassifier([texts[i] for i in rows[train]], y[train].tolist())
    raw = torch.tensor(clf.decision(texts), dtype=torch.float32)[:, None]
    return standardize(raw[train], y[train], raw[~train])[:, 0]


def surface_scores(
    texts: Sequence[str],
    lengths: Sequence[int],
    y: Bool[Tensor, " n"],
    fold: Int[Tensor, " n"],
    kind: str,
) -> Float[Tensor, " n"]:
    """Out-of-fold standardised scores of a surface baseline (``kind`` in :data:`BASELINES`),
    fitted on the other folds exactly like a vector."""
    if kind not in BASELINES:
        raise TLExtractError(f"unknown baseline {kind!r}; choose from {', '.join(BASELINES)}.")
    scores = torch.full((len(texts),), float("nan"))
    for f in fold.unique().tolist():
        test = fold == f
        scores[test] = _fold_scores(texts, lengths, y, ~test, kind)
    return scores
