"""Trait vectors from prompts in memory, in one call: no experiment folder, nothing written
unless asked.

:func:`extract` takes positive and negative user messages (the model answers them, as the
pipeline's natural variant does) or (message, response) pairs (no generation), and runs the
pipeline's own computation on them in memory (:mod:`tlextract.stages.compute`: the functions the
generate and activations stages save shards of), then fits a method. The result is a
:class:`TraitVectors`, so :func:`tlextract.steer` and :func:`tlextract.monitor` take it as it is;
it also carries the pooled activations and responses, and :meth:`Extraction.evaluate` gives the
nested cross-validated figures (an :class:`ExtractionEvaluation`).

Pooling: ``"response"`` averages over the response tokens (the pipeline's only pooling);
``"prompt_last"`` takes the residual at the last token the model reads, no generation: the
rendered prompt's, or the given response's last token for (message, response) pairs (the
contrast steering-vectors and repeng read). Sides whose activations have the same mean (every
vector zero) are refused with an error, never returned. Mode (generated responses only):
``"two-stage"`` generates and then re-reads each prompt and response in one teacher-forced pass;
``"combined"`` averages the residual while generating.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from tlextract.config import DEFAULT_HOOK, EVALUATION, GenerationSettings
from tlextract.engines.tl import TLEngine
from tlextract.errors import TLExtractError
from tlextract.inputs import PathArg
from tlextract.model.decoding import Model
from tlextract.model.tokens import device_of, text_ids, tokenizer_of, user_prompts
from tlextract.ops.bootstrap import Interval, bootstrap_rows
from tlextract.ops.folds import fold_of, nested
from tlextract.ops.methods import get_method, run_method
from tlextract.ops.trait_vectors import TraitVectors
from tlextract.settings import MODES, Mode
from tlextract.stages.compute import Capture, generate_records, in_memory, pool_records

Pooling = Literal["response", "prompt_last"]
Examples = Sequence[str] | Sequence[tuple[str, str]]


@dataclass(frozen=True)
class ExtractionEvaluation:
    """What :meth:`Extraction.evaluate` measured: nested cross-validated accuracy, AUROC and
    Cohen's d of ``method`` with 95% bootstrap intervals, and ``layer``, the block with the
    highest out-of-fold AUROC (the block to use the vectors at)."""

    method: str
    layer: int
    accuracy: Interval
    auroc: Interval
    cohens_d: Interval
    folds: int
    n: dict[str, int]  # rows per polarity, each scored once


@dataclass(frozen=True)
class Extraction(TraitVectors):
    """Vectors plus what they were fitted on: ``pos``/``neg`` the pooled activations
    ``[n, layer, d_model]``, ``responses`` the texts pooled over (empty for ``prompt_last``)."""

    pos: Tensor = field(default_factory=lambda: torch.empty(0))
    neg: Tensor = field(default_factory=lambda: torch.empty(0))
    responses: dict[str, list[str]] = field(default_factory=dict)

    def evaluate(
        self, folds: int = EVALUATION.folds, seed: int = 0, n_boot: int = EVALUATION.n_boot
    ) -> ExtractionEvaluation:
        """Nested cross-validation of this method, like :func:`tlextract.cross_validate` on a
        run (rows of pos and neg are paired by position, as the pipeline pairs example
        indices)."""
        groups = list(range(len(self.pos))) + list(range(len(self.neg)))
        x = torch.cat([self.pos, self.neg])
        y = torch.tensor([True] * len(self.pos) + [False] * len(self.neg))
        fold = fold_of(groups, folds, seed, arg="evaluate(folds=...)")
        result = nested(x, y, fold, lambda p, n: run_method(self.method, p, n, seed=seed))
        figures = bootstrap_rows(result.scores, y, groups, n_boot, seed)
        return ExtractionEvaluation(
            self.method, self.layers[result.layer], figures["accuracy"], figures["auroc"],
            figures["cohens_d"], folds, {"pos": len(self.pos), "neg": len(self.neg)},
        )  # fmt: skip


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


@dataclass(frozen=True)
class _Options:
    capture: Capture
    pooling: Pooling
    style: str
    generation: GenerationSettings
    batch_size: int


def _records(
    model: Model,
    examples: Examples,
    polarity: str,
    opts: _Options,
    seeds: Sequence[int],
) -> tuple[list[dict[str, Any]], Capture]:
    """Records of one polarity as the responses stage writes them, and how to pool them:
    generated (the pipeline's :func:`generate_records`, in ``opts``' mode) or the given
    responses (read in a teacher-forced pass); for ``prompt_last`` the last token of what the
    model reads (the prompt, and the given response when there is one) plays the response,
    one token long."""
    texts, given = _split(examples, "positive" if polarity == "pos" else "negative")
    prompts = user_prompts(model, texts, opts.style)
    meta = [{"polarity": polarity, "index": i} for i in range(len(prompts))]
    if given is None and opts.pooling == "response":
        names = opts.capture.while_generating
        acts_shape = (len(names), model.cfg.d_model) if names else None
        records, _ = generate_records(
            TLEngine(model, names), tokenizer_of(model), prompts, meta, seeds, opts.generation,
            opts.batch_size, in_memory, device_of(model), f"extract {polarity}", acts_shape,
        )  # fmt: skip
        return records, opts.capture
    answers = text_ids(model, given) if given is not None else [[] for _ in prompts]
    if opts.pooling == "prompt_last":
        read = [p + a for p, a in zip(prompts, answers, strict=True)]
        prompts, answers = [r[:-1] for r in read], [r[-1:] for r in read]
    records = [{**m, "prompt_ids": p, "response_ids": a, "n_response_tokens": len(a)}
               for m, p, a in zip(meta, prompts, answers, strict=True)]  # fmt: skip
    return records, replace(opts.capture, mode="two-stage")


def _side(
    model: Model,
    examples: Examples,
    polarity: str,
    opts: _Options,
    seeds: Sequence[int],
) -> tuple[Float[Tensor, "n layer d_model"], list[str]]:
    """Pooled activations of one polarity (rows with an empty response left out, as the
    pipeline leaves them out) and the responses they were pooled over."""
    records, capture = _records(model, examples, polarity, opts, seeds)
    pooled = pool_records(model, records, capture, opts.batch_size, in_memory,
                          device_of(model), f"extract pool {polarity}")  # fmt: skip
    keep = [r for r in records if (r["polarity"], r["index"]) in pooled]
    if not keep:
        return torch.empty(0), []
    acts = torch.stack([pooled[(r["polarity"], r["index"])] for r in keep]).cpu()
    if opts.pooling == "prompt_last":
        return acts, []
    texts = tokenizer_of(model).batch_decode([r["response_ids"] for r in keep],
                                             skip_special_tokens=True)  # fmt: skip
    return acts, texts


def extract(
    model: Model,
    pos: Examples,
    neg: Examples,
    *,
    layers: Sequence[int] | Literal["all"] = "all",
    hook: str = DEFAULT_HOOK,
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
    if pooling not in ("response", "prompt_last") or mode not in MODES:
        raise TLExtractError(
            f"extract: pooling {pooling!r} / mode {mode!r}: use response or prompt_last, and "
            "two-stage or combined."
        )
    get_method(method)
    capture = Capture.of(mode, hook, layers, model.cfg.n_layers)
    opts = _Options(capture, pooling, style, generation or GenerationSettings(), batch_size)
    n_pos = len(pos)
    seeds = list(seeds) if seeds is not None else list(range(n_pos + len(neg)))
    if len(seeds) != n_pos + len(neg):
        raise TLExtractError(f"extract: {len(seeds)} seeds for {n_pos + len(neg)} examples.")
    pos_acts, pos_texts = _side(model, pos, "pos", opts, seeds[:n_pos])
    neg_acts, neg_texts = _side(model, neg, "neg", opts, seeds[n_pos:])
    if not len(pos_acts) or not len(neg_acts):
        raise TLExtractError("extract: every response on one side was empty; nothing to fit.")
    if torch.equal(pos_acts.mean(0), neg_acts.mean(0)):
        raise TLExtractError(
            f"extract: the {pooling} activations of both sides have the same mean, so every "
            "vector would be zero (e.g. prompt_last on pairs that share their prompts and "
            "responses). Give the sides different text, or pool over the responses."
        )
    vectors = run_method(method, pos_acts, neg_acts)
    result = Extraction(
        trait=trait, method=method, model=model.cfg.model_name, hook=hook, layers=capture.layers,
        vectors=vectors,
        metadata={"n_pos": len(pos_acts), "n_neg": len(neg_acts), "pooling": pooling,
                  "mode": mode, "norms": [round(float(n), 6) for n in vectors.norm(dim=-1)]},
        pos=pos_acts, neg=neg_acts, responses={"pos": pos_texts, "neg": neg_texts},
    )  # fmt: skip
    if save is not None:
        result.save(save)
    return result
