"""The data an alarm is fitted and measured on (:class:`tlextract.monitoring.alarm.TokenData`): a
run's kept responses, pooled as saved and re-read token by token (teacher-forced, the model as it
is), and the shipped neutral corpus's two halves read as answers to neutral questions."""

from __future__ import annotations

from collections.abc import Sequence

from tlextract.config import EVALUATION
from tlextract.errors import TLExtractError
from tlextract.evaluation.heldout import load_kept
from tlextract.model.decoding import Model
from tlextract.monitoring.alarm import (
    DEFAULT_FORMULATION,
    DEFAULT_RATE,
    FORMULATIONS,
    Alarm,
    AlarmFigures,
    Formulation,
    TokenData,
    fit_alarm,
    measure,
)
from tlextract.ops.fluency import neutral_answers
from tlextract.ops.neutral import corpus_split
from tlextract.ops.pool import hook_name
from tlextract.ops.token_acts import answer_residuals
from tlextract.settings import RunSettings
from tlextract.stages.responses import load_responses


def load_token_data(
    model: Model, run: RunSettings, layers: Sequence[int] | None = None
) -> tuple[TokenData, list[str]]:
    """The run's TokenData at ``layers`` (default: every layer of its activations) and the
    hook name of each layer."""
    kept = load_kept(run)
    acts = kept.acts
    layers = list(acts.layers) if layers is None else list(layers)
    missing = [layer for layer in layers if layer not in acts.layers]
    if missing:
        raise TLExtractError(f"the kept activations have no layer(s) {missing}; they have "
                             f"{list(acts.layers)}.")  # fmt: skip
    columns = [acts.layers.index(layer) for layer in layers]
    names = [hook_name(acts.hook, layer) for layer in layers]
    responses, _ = load_responses(run)
    row = {(r["polarity"], r["index"]): r for r in responses}

    def tokens(polarity: str, index: list[int]) -> list:
        rows = [row[(polarity, i)] for i in index]
        return answer_residuals(
            model, [r["prompt_ids"] for r in rows], [r["response_ids"] for r in rows], names
        )

    cal, test = corpus_split()
    style = run.experiment.prompt_style
    return TokenData(
        layers=layers,
        pooled_pos=acts.pos[:, columns],
        pooled_neg=acts.neg[:, columns],
        pos_index=list(acts.pos_index),
        neg_index=list(acts.neg_index),
        pos_tokens=tokens("pos", acts.pos_index),
        neg_tokens=tokens("neg", acts.neg_index),
        neutral_cal=answer_residuals(model, *neutral_answers(model, style, cal), names),
        neutral_test=answer_residuals(model, *neutral_answers(model, style, test), names),
    ), names


def monitor_alarm(
    model: Model,
    run: RunSettings,
    rate: float = DEFAULT_RATE,
    folds: int = EVALUATION.folds,
    formulation: Formulation = DEFAULT_FORMULATION,
) -> Alarm:
    """The alarm ``monitor`` uses for ``run``'s trait: ``formulation`` measured at ``rate`` and
    fitted on all the data."""
    data, names = load_token_data(model, run)
    figures = measure(data, formulation, rate, folds, run.experiment.seed)
    return fit_alarm(data, run.trait.name, names, figures, run.experiment.seed)


def compare_formulations(
    model: Model,
    run: RunSettings,
    rate: float = DEFAULT_RATE,
    folds: int = EVALUATION.folds,
    fixed_layer: int | None = None,
) -> list[AlarmFigures]:
    """Every formulation of :data:`FORMULATIONS` at ``rate`` (and mean_diff alone at
    ``fixed_layer``, the layer the evaluation chose, when given), on the same data."""
    data, _ = load_token_data(model, run)
    chosen = [Formulation("mean_diff", 1, fixed_layer)] if fixed_layer is not None else []
    return [measure(data, f, rate, folds, run.experiment.seed) for f in [*chosen, *FORMULATIONS]]
