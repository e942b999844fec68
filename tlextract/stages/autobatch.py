"""``--batch-size auto``: the largest batch a memory budget holds, from peaks measured on this
model, device and dtype (a few small probes of the real generation and teacher-forced pass)."""

from __future__ import annotations

import logging
import weakref
from collections.abc import Sequence

from tlextract.config import GenerationSettings
from tlextract.model.accel import decode_session
from tlextract.model.decoding import Model
from tlextract.model.memory import GiB, MemoryModel, PeakMemory, default_budget, fit_memory_model
from tlextract.model.tokens import tokenizer_of
from tlextract.ops.generate import generate_batch
from tlextract.ops.pool import hook_name, pooled_activations

log = logging.getLogger(__name__)
# (rows, tokens per row), varied so every term of the model is identifiable; small, so the
# probes take seconds even on a CPU.
PROBES = ((1, 32), (2, 64), (4, 32), (4, 64), (2, 128))
PROBE_NEW_TOKENS = 2
MAX_AUTO_BATCH = 64
# Fitted once per model, layers and hook: a run asks in every stage of every trait.
_Fits = dict[tuple[tuple[int, ...], str], MemoryModel]
_FITTED: weakref.WeakKeyDictionary[Model, _Fits] = weakref.WeakKeyDictionary()


def measure_peaks(
    model: Model,
    layers: Sequence[int],
    hook: str,
    probes: Sequence[tuple[int, int]] = PROBES,
) -> list[tuple[int, int, float]]:
    """Peak extra bytes of generating (with activation capture) and of the teacher-forced pass,
    whichever is larger, for each (rows, tokens per row).

    Rows start with different tokens, so no prompt prefix is shared (the most memory a batch
    of real prompts can take); weights are packed for decoding before anything is measured
    (that copy belongs to the model, not to a batch)."""
    filler = tokenizer_of(model).encode(" the", add_special_tokens=False)[0]
    names = [hook_name(hook, layer) for layer in layers]
    greedy = GenerationSettings(max_new_tokens=PROBE_NEW_TOKENS, do_sample=False)
    points = []
    with decode_session(model):
        for rows, length in probes:
            prompts = [
                [(filler + r) % model.cfg.d_vocab] + [filler] * (length - PROBE_NEW_TOKENS - 1)
                for r in range(rows)
            ]
            with PeakMemory(model.cfg.device) as gen:
                generate_batch(model, prompts, greedy, seeds=[0] * rows, capture=names)
            responses = [[filler] * PROBE_NEW_TOKENS] * rows
            with PeakMemory(model.cfg.device) as fwd:
                pooled_activations(model, prompts, responses, layers, hook)
            points.append((rows, length, float(max(gen.peak, fwd.peak))))
    return points


def auto_batch_size(
    model: Model,
    length: int,
    n_items: int,
    layers: Sequence[int],
    hook: str,
    budget: float | None = None,
) -> int:
    """The largest batch (up to ``n_items``) of ``length``-token rows whose predicted peak fits
    ``budget`` bytes (default: :func:`~tlextract.model.memory.default_budget`)."""
    budget = default_budget(model.cfg.device) if budget is None else budget
    per_model = _FITTED.setdefault(model, {})
    key = (tuple(layers), hook)
    if key not in per_model:
        per_model[key] = fit_memory_model(measure_peaks(model, layers, hook))
    fitted = per_model[key]
    size = fitted.largest_batch(length, budget, min(n_items, MAX_AUTO_BATCH))
    log.info(
        "batch size auto: %d (rows of %d tokens, predicted %.2f GiB of a %.2f GiB budget)",
        size, length, fitted.predict(size, length) / GiB, budget / GiB,
    )  # fmt: skip
    return size
