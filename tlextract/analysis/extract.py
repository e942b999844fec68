"""Trait vectors from prompts in memory, in one call: no experiment folder, nothing written
unless asked.

:func:`extract` takes positive and negative user messages (the model answers them, as the
pipeline's natural variant does) or (message, response) pairs (no generation), pools the residual
the way the pipeline does, with the same functions (:func:`tlextract.ops.generate.generate_batch`,
:func:`tlextract.ops.pool.pooled_activations`), and fits a method. The result is a
:class:`TraitVectors`, so :func:`tlextract.steer` and :func:`tlextract.monitor` take it as it is;
it also carries the pooled activations and responses, and :meth:`Extraction.evaluate` gives the
nested cross-validated figures.

Pooling: ``"response"`` averages over the response tokens (the pipeline's only pooling);
``"prompt_last"`` takes the last token of the rendered prompt (the contrast steering-vectors and
repeng read off prompts alone, no generation). Mode (generated responses only): ``"two-stage"``
generates and then re-reads each prompt and response in one teacher-forced pass;
``"combined"`` averages the residual while generating.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer

from tlextract.config import GenerationSettings
from tlextract.errors import TLExtractError
from tlextract.inputs import PathArg
from tlextract.model.tokens import text_ids, tokenizer_of, user_prompts
from tlextract.ops.bootstrap import Interval, bootstrap_rows
from tlextract.ops.crossval import DEFAULT_FOLDS, fold_of, nested, pick_layer
from tlextract.ops.generate import generate_batch
from tlextract.ops.methods import get_method, run_method
from tlextract.ops.pool import hook_name, pooled_activations, resolve_layers
from tlextract.ops.vectors import TraitVectors

Pooling = Literal["response", "prompt_last"]
Mode = Literal["two-stage", "combined"]
Examples = Sequence[str] | Sequence[tuple[str, str]]


@dataclass(frozen=True)
class Extraction(TraitVectors):
    """Vectors plus what they were fitted on: ``pos``/``neg`` the pooled activations
    ``[n, layer, d_model]``, ``responses`` the texts pooled over (empty for ``prompt_last``)."""

    pos: Tensor = field(default_factory=lambda: torch.empty(0))
    neg: Tensor = field(default_factory=lambda: torch.empty(0))
    responses: dict[str, list[str]] = field(default_factory=dict)

    def evaluate(
        self, folds: int = DEFAULT_FOLDS, seed: int = 0, n_boot: int = 2000
    ) -> dict[str, Interval | int]:
        """Nested cross-validated accuracy, AUROC and Cohen's d of this method with 95%
        bootstrap intervals (rows of pos and neg are paired by position, as the pipeline pairs
        example indices), and ``layer``: the block with the highest out-of-fold AUROC."""
        groups = list(range(len(self.pos))) + list(range(len(self.neg)))
        x = torch.cat([self.pos, self.neg])
        y = torch.tensor([True] * len(self.pos) + [False] * len(self.neg))
        fold = fold_of(groups, folds, seed, arg="evaluate(folds=...)")
        result = nested(x, y, fold, lambda p, n: run_method(self.method, p, n, seed=seed))
        figures = bootstrap_rows(result.scores, y, groups, n_boot, seed)
        return {"layer": self.layers[pick_layer(result.per_layer, y)], **figures}


def _split(examples: Examples, what: str) -> tuple[list[str], list[str] | None]:
    if not examples:
        raise TLExtractError(f"extract: no {what} examples.")
    if all(isinstance(e, str) for e in examples):
        return [str(e) for e in examples], None
    pairs = [e for e in examples if isinstance(e, tuple) and len(e) == 2]
    if len(pairs) == len(examples):
        return [str(p) for p, _ in pairs], [str(r) for _, r in pairs]
    raise TLExtractError(
        f"extract: {what} examples must all be prompts (str) or all (prompt, response) pairs."
    )


def _pool(
    model: HookedTransformer,
    prompts: list[list[int]],
    responses: list[list[int]],
    names: list[str],
    layers: tuple[int, ...],
    hook: str,
    batch_size: int,
) -> Float[Tensor, "n layer d_model"]:
    rows = [
        pooled_activations(
            model, prompts[i : i + batch_size], responses[i : i + batch_size], layers, hook
        )  # fmt: skip
        for i in range(0, len(prompts), batch_size)
    ]
    return torch.cat(rows) if rows else torch.empty(0, len(names), model.cfg.d_model)


def _side(
    model: HookedTransformer,
    examples: Examples,
    what: str,
    opts: _Options,
    seeds: Sequence[int],
) -> tuple[Float[Tensor, "n layer d_model"], list[str]]:
    """Pooled activations of one polarity (rows with an empty response dropped) and the
    responses they were pooled over."""
    texts, given = _split(examples, what)
    tok = tokenizer_of(model)
    prompts = user_prompts(model, texts, opts.style)
    if opts.pooling == "prompt_last":
        return _pool(model, [p[:-1] for p in prompts], [p[-1:] for p in prompts], opts.names,
                     opts.layers, opts.hook, opts.batch_size), []  # fmt: skip
    if given is not None:
        responses = text_ids(model, given)
    else:
        gens = [
            g
            for i in range(0, len(prompts), opts.batch_size)
            for g in generate_batch(model, prompts[i : i + opts.batch_size], opts.generation,
                                    seeds[i : i + opts.batch_size],
                                    capture=opts.names if opts.mode == "combined" else ())
        ]  # fmt: skip
        responses = [g.response_ids for g in gens]
        if opts.mode == "combined":
            pooled = [g.pooled for g in gens if g.pooled is not None]
            kept = [r for r in responses if r]
            return (torch.stack(pooled).cpu() if pooled else torch.empty(0)), tok.batch_decode(
                kept, skip_special_tokens=True
            )
    keep = [i for i, r in enumerate(responses) if r]
    acts = _pool(model, [prompts[i] for i in keep], [responses[i] for i in keep], opts.names,
                 opts.layers, opts.hook, opts.batch_size)  # fmt: skip
    return acts, tok.batch_decode([responses[i] for i in keep], skip_special_tokens=True)


@dataclass(frozen=True)
class _Options:
    layers: tuple[int, ...]
    names: list[str]
    hook: str
    pooling: Pooling
    mode: Mode
    style: str
    generation: GenerationSettings
    batch_size: int


def extract(
    model: HookedTransformer,
    pos: Examples,
    neg: Examples,
    *,
    layers: Sequence[int] | Literal["all"] = "all",
    hook: str = "resid_post",
    pooling: Pooling = "response",
    mode: Mode = "two-stage",
    method: str = "mean_diff",
    style: str = "chat",
    generation: GenerationSettings | None = None,
    seeds: Sequence[int] | None = None,
    batch_size: int = 8,
    trait: str = "trait",
    save: PathArg | None = None,
) -> Extraction:
    # long: checks, both polarities, the fit and the record; each step is one call
    """Vectors of ``method`` from ``pos`` and ``neg`` (see the module docstring).

    ``seeds`` (one per example, pos then neg; default 0, 1, 2, ...) decide each generated
    response alone, as in the pipeline; ``generation`` defaults to the pipeline's (40 sampled
    tokens at temperature 1). ``save`` writes the vectors there (tlextract's format)."""
    if pooling not in ("response", "prompt_last") or mode not in ("two-stage", "combined"):
        raise TLExtractError(
            f"extract: pooling {pooling!r} / mode {mode!r}: use response or prompt_last, and "
            "two-stage or combined."
        )
    get_method(method)
    blocks = resolve_layers(layers, model.cfg.n_layers)
    opts = _Options(blocks, [hook_name(hook, b) for b in blocks], hook, pooling, mode, style,
                    generation or GenerationSettings(), batch_size)  # fmt: skip
    n_pos = len(pos)
    seeds = list(seeds) if seeds is not None else list(range(n_pos + len(neg)))
    if len(seeds) != n_pos + len(neg):
        raise TLExtractError(f"extract: {len(seeds)} seeds for {n_pos + len(neg)} examples.")
    pos_acts, pos_texts = _side(model, pos, "positive", opts, seeds[:n_pos])
    neg_acts, neg_texts = _side(model, neg, "negative", opts, seeds[n_pos:])
    if not len(pos_acts) or not len(neg_acts):
        raise TLExtractError("extract: every response on one side was empty; nothing to fit.")
    vectors = run_method(method, pos_acts, neg_acts)
    result = Extraction(
        trait=trait, method=method, model=model.cfg.model_name, hook=hook, layers=blocks,
        vectors=vectors,
        metadata={"n_pos": len(pos_acts), "n_neg": len(neg_acts), "pooling": pooling,
                  "mode": mode, "norms": [round(float(n), 6) for n in vectors.norm(dim=-1)]},
        pos=pos_acts, neg=neg_acts, responses={"pos": pos_texts, "neg": neg_texts},
    )  # fmt: skip
    if save is not None:
        result.save(save)
    return result
