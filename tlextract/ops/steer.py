"""Interventions with a trait direction: add it to the residual stream (steering) or project it
out (ablation), through TransformerLens hooks, for as long as a ``with`` block lasts.

Both work with batched generation and the KV cache (:func:`tlextract.ops.generate.generate_batch`),
with ``run_with_cache`` and with plain forward passes, because they only add a hook at one hook
point (``blocks.{layer}.hook_resid_post`` for vectors from this package).

**Strength.** :func:`steer` adds ``alpha * scale * u``, where ``u`` is the unit trait vector and
``scale`` the layer's *typical residual norm*: the median L2 norm of the hook's output over every
token of a few fixed neutral English sentences (:data:`REFERENCE_TEXTS`, :func:`residual_norm`).
So ``alpha = 0.5`` adds a vector half as long as a typical residual at that layer, whatever the
model or layer. The median rather than the mean because a few tokens carry "massive
activations": from SmolLM2's middle layers on, the first token of each sentence is about 100x
longer than the others and would make a mean describe it alone. For scale: SmolLM2's
mean-difference vectors are 4-22% of that norm at layers 10-22, so alpha 0.05-0.2 adds about one
raw vector.

**Positions.** During generation with the KV cache the first forward pass covers the whole
(left-padded) prompt and every later pass one new token, which is how the hooks tell them apart:

* ``"all"``: every position;
* ``"prompt"``: every position of the prompt pass (padding too: it is masked out of attention, so
  it changes nothing);
* ``"response"``: every position whose next-token prediction is a response token: the last prompt
  position and each generated token (persona_vectors' convention).

A pass over a single position counts as a generated token, so a batch whose prompts are all one
token long is not steered by ``"prompt"``. A teacher-forced pass over prompt + response looks like
a prompt pass; use ``"all"`` there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from jaxtyping import Float
from torch import Tensor

from tlextract.config import DEFAULT_HOOK
from tlextract.errors import TLExtractError
from tlextract.model.decoding import Model, teacher_forced
from tlextract.model.tokens import device_of, left_pad, text_ids, tokenizer_of
from tlextract.ops.neutral import NEUTRAL_TEXTS
from tlextract.ops.pool import hook_name
from tlextract.ops.trait_vectors import TraitVectors

Positions = Literal["all", "prompt", "response"]
POSITIONS: tuple[str, ...] = get_args(Positions)

# The first four neutral sentences: scales measured before there were more stay the same.
REFERENCE_TEXTS = NEUTRAL_TEXTS[:4]
"""Neutral text on which :func:`residual_norm` measures a layer's typical residual norm."""

Edit = Callable[[Tensor], Tensor]


def unit_direction(
    model: Model,
    vector: TraitVectors | Float[Tensor, " d_model"],
    layer: int,
    hook: str = DEFAULT_HOOK,
) -> tuple[str, Float[Tensor, " d_model"]]:
    """The hook name and float32 unit vector for ``layer``, checked against the model.

    A :class:`TraitVectors` gives its own vector and hook for ``layer``; a bare tensor is used at
    ``blocks.{layer}.hook_{hook}``."""
    n_layers = model.cfg.n_layers
    if not 0 <= layer < n_layers:
        raise TLExtractError(
            f"layer {layer} does not exist: this model has blocks 0..{n_layers - 1} "
            "(TransformerLens block indices)."
        )
    if isinstance(vector, TraitVectors):
        if layer not in vector.layers:
            raise TLExtractError(
                f"the {vector.trait} vectors ({vector.method}) have no layer {layer}; "
                f"they have {list(vector.layers)}."
            )
        name, v = vector.hook_name(layer), vector[layer]
    else:
        name, v = hook_name(hook, layer), vector
    if v.ndim != 1 or v.shape[0] != model.cfg.d_model:
        raise TLExtractError(
            f"the vector has shape {list(v.shape)} but this model's residual stream has d_model "
            f"{model.cfg.d_model}: it belongs to another model."
        )
    norm = v.float().norm()
    if not torch.isfinite(norm) or norm == 0:
        raise TLExtractError(f"the vector for layer {layer} is zero or not finite: no direction.")
    return name, (v.float() / norm).to(model.cfg.device)


def _hook_of(vector: TraitVectors | Tensor, hook: str) -> str:
    return vector.hook if isinstance(vector, TraitVectors) else hook


@torch.inference_mode()
def residual_norm(
    model: Model,
    layer: int,
    texts: Sequence[str] = REFERENCE_TEXTS,
    hook: str = DEFAULT_HOOK,
) -> float:
    """Median L2 norm of ``blocks.{layer}.hook_{hook}`` over every token of ``texts`` (tokenized
    without special tokens; padding left out): the unit of :func:`steer`'s ``alpha``."""
    if not 0 <= layer < model.cfg.n_layers:
        raise TLExtractError(
            f"layer {layer} does not exist: this model has blocks 0..{model.cfg.n_layers - 1}."
        )
    tok = tokenizer_of(model)
    tokens, mask = left_pad(text_ids(model, texts), tok.pad_token_id, device_of(model))
    name = hook_name(hook, layer)
    _, acts = teacher_forced(model, tokens, mask, [name], stop_at_layer=layer + 1)
    norms = acts[name].float().norm(dim=-1)[mask.bool()]
    return float(norms.median())


def _at(positions: Positions, edit: Edit) -> Callable[..., Tensor]:
    """A hook that applies ``edit`` to the selected positions (see the module docstring)."""
    if positions not in POSITIONS:
        raise TLExtractError(f"positions {positions!r}: use one of {', '.join(POSITIONS)}.")

    def apply(resid: Float[Tensor, "batch pos d_model"], hook: object) -> Tensor:
        if resid.shape[1] == 1:  # a decode step: one generated token per row
            return resid if positions == "prompt" else edit(resid)
        if positions == "response":  # the prompt pass: only its last position predicts a response
            return torch.cat([resid[:, :-1], edit(resid[:, -1:])], dim=1)
        return edit(resid)

    return apply


@dataclass(frozen=True)
class Intervention:
    """What a :func:`steer` or :func:`ablate` block does, for the record."""

    kind: Literal["steer", "ablate"]
    hook_name: str
    positions: Positions
    alpha: float  # 0 for an ablation
    scale: float  # typical residual norm (alpha's unit); 0 for an ablation
    direction: Float[Tensor, " d_model"]  # the unit vector


@contextmanager
def steer(
    model: Model,
    vector: TraitVectors | Float[Tensor, " d_model"],
    layer: int,
    alpha: float,
    positions: Positions = "all",
    *,
    scale: float | None = None,
    hook: str = DEFAULT_HOOK,
) -> Iterator[Intervention]:
    """Inside the block, add ``alpha * scale * u`` at ``layer``'s hook at ``positions``.

    ``u`` is the unit vector of ``vector`` at ``layer`` and ``scale`` defaults to
    :func:`residual_norm` (the median residual norm at that hook on :data:`REFERENCE_TEXTS`), so
    ``alpha`` is measured in typical residual norms. Pass ``scale`` to reuse one measurement
    across many blocks. ``alpha = 0`` leaves every output unchanged."""
    name, unit = unit_direction(model, vector, layer, hook)
    if scale is None:
        scale = residual_norm(model, layer, hook=_hook_of(vector, hook))
    delta = alpha * scale * unit

    def add(x: Tensor) -> Tensor:
        return x + delta.to(x.dtype)

    with model.hooks(fwd_hooks=[(name, _at(positions, add))]):
        yield Intervention("steer", name, positions, alpha, scale, unit.cpu())


@contextmanager
def ablate(
    model: Model,
    vector: TraitVectors | Float[Tensor, " d_model"],
    layer: int,
    positions: Positions = "all",
    *,
    hook: str = DEFAULT_HOOK,
) -> Iterator[Intervention]:
    """Inside the block, project the direction out at ``layer``'s hook: ``x - (x . u) u``."""
    name, unit = unit_direction(model, vector, layer, hook)

    def remove(x: Tensor) -> Tensor:
        u = unit.to(x.dtype)
        return x - (x @ u)[..., None] * u

    with model.hooks(fwd_hooks=[(name, _at(positions, remove))]):
        yield Intervention("ablate", name, positions, 0.0, 0.0, unit.cpu())
