"""The held-out split and what it is drawn from: the examples the judge kept, split by example
index (a question is never on both sides), rows and layers picked out for each side."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from jaxtyping import Float
from torch import Tensor

from tlextract.config import EVALUATION
from tlextract.errors import TLExtractError
from tlextract.judge.keep import Selection
from tlextract.ops.metrics import split_indices
from tlextract.settings import RunSettings
from tlextract.stages.activations import Activations, load_activations
from tlextract.stages.judge import load_selection
from tlextract.store import fingerprint

# (pos, neg) activations of one side of a split at the evaluated layers; "_" dims are unchecked
# because train and test sides of different sizes meet in one call.
Pair = tuple[Float[Tensor, "_n_pos sel d_model"], Float[Tensor, "_n_neg sel d_model"]]


@dataclass(frozen=True)
class ExampleSplit:
    """Which rows of each polarity's activations are train and which are test.

    ``held_out`` holds the test *example indices*; a row is a test row exactly when its example
    index is held out, whatever its polarity.
    """

    held_out: frozenset[int]
    pos_train: list[int]
    pos_test: list[int]
    neg_train: list[int]
    neg_test: list[int]


def split_examples(
    pos_index: Sequence[int],
    neg_index: Sequence[int],
    test_fraction: float = EVALUATION.test_fraction,
    seed: int = 0,
) -> ExampleSplit:
    """Seeded split of the example indices present on either side (see ``split_indices``)."""
    ids = sorted(set(pos_index) | set(neg_index))
    _, test = split_indices(len(ids), test_fraction, seed)
    held_out = frozenset(ids[i] for i in test.tolist())

    def rows(index: Sequence[int], test_side: bool) -> list[int]:
        return [r for r, i in enumerate(index) if (i in held_out) == test_side]

    return ExampleSplit(
        held_out,
        rows(pos_index, False),
        rows(pos_index, True),
        rows(neg_index, False),
        rows(neg_index, True),
    )


def kept_activations(acts: Activations, selection: Selection) -> Activations:
    """Only the rows of examples the judge kept (what the vectors stage fits on); the key
    covers the selection too."""

    def keep(
        x: Float[Tensor, "n layer d_model"], index: list[int], kept: list[int]
    ) -> tuple[Float[Tensor, "k layer d_model"], list[int]]:
        wanted = set(kept)
        rows = [r for r, i in enumerate(index) if i in wanted]
        return x[rows], [index[r] for r in rows]

    (pos, pos_index), (neg, neg_index) = (
        keep(acts.pos, acts.pos_index, selection.kept["pos"]),
        keep(acts.neg, acts.neg_index, selection.kept["neg"]),
    )
    return replace(
        acts,
        pos=pos,
        neg=neg,
        pos_index=pos_index,
        neg_index=neg_index,
        key=fingerprint([acts.key, selection.kept]),
    )


@dataclass(frozen=True)
class KeptRun:
    run: RunSettings
    acts: Activations  # kept examples only
    judge: str


def load_kept(run: RunSettings) -> KeptRun:
    """The run's activations of the examples the judge kept, and the judge's name."""
    selection = load_selection(run)
    return KeptRun(
        run, kept_activations(load_activations(run), selection), selection.summary["judge"]
    )


def rows_at(
    acts: Float[Tensor, "n layer d_model"], rows: list[int], columns: list[int]
) -> Float[Tensor, "k sel d_model"]:
    return acts[rows][:, columns]


def common_layers(source: Activations, target: Activations) -> list[int]:
    if source.hook != target.hook:
        raise TLExtractError(
            f"cannot score {source.hook} vectors on {target.hook} activations; "
            "use runs with the same hook."
        )
    layers = [layer for layer in source.layers if layer in target.layers]
    if not layers:
        raise TLExtractError(
            f"no layer in common between {list(source.layers)} and {list(target.layers)}."
        )
    return layers


def side_of(acts: Activations, layers: list[int], split: ExampleSplit, test: bool) -> Pair:
    """(pos, neg) rows of one side of ``split``, at ``layers``."""
    columns = [acts.layers.index(layer) for layer in layers]
    return (
        rows_at(acts.pos, split.pos_test if test else split.pos_train, columns),
        rows_at(acts.neg, split.neg_test if test else split.neg_train, columns),
    )
