"""Screening training data for a trait before fine-tuning on it (persona_vectors, Chen et al.
2025): the *projection difference* of a sample (prompt, response) is the projection of the
response's mean residual on the trait's unit vector minus that of the model's own response to
the same prompt. Averaged over a dataset it predicts the trait's shift after fine-tuning on it;
per sample it ranks the samples that push the trait.

Both responses are read by a teacher-forced pass over prompt + response, averaged over the
response tokens only (the pipeline's pooling, :func:`tlextract.stages.compute.pool_records`);
the model's own responses come from the TransformerLens engine as the pipeline's do
(:func:`tlextract.stages.compute.generate_records`: one seeded generator per sample), once for
every trait. Scores are in activation units along the unit vector, as in
:func:`tlextract.ops.metrics.project`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from tlextract.config import GenerationSettings
from tlextract.engines.tl import TLEngine
from tlextract.errors import TLExtractError
from tlextract.model.decoding import Model
from tlextract.model.tokens import device_of, text_ids, tokenize, tokenizer_of
from tlextract.ops.bootstrap import Interval, bootstrap_rows, mean_interval
from tlextract.ops.fit import check_fit
from tlextract.ops.monitor import layer_per_trait, trait_vectors_by_name
from tlextract.ops.steer import unit_direction
from tlextract.ops.trait_vectors import TraitVectors
from tlextract.screen_data import Sample, as_samples
from tlextract.stages.compute import Capture, Shards, generate_records, in_memory, pool_records
from tlextract.traits import render_prompt

log = logging.getLogger(__name__)
Vectors = Mapping[str, TraitVectors] | Sequence[TraitVectors] | TraitVectors
# The baseline is the model's own answer *sampled* (temperature 1): what fine-tuning starts from,
# so the model's own answers score 0 on average. A greedy answer is not a typical one: it sits
# off that mean (smollm2, block 12: plain sampled answers scored +3.3, -3.1 and +1.3 against
# greedy ones on three of four traits; docs/applications.md).
OWN_ANSWER = GenerationSettings()


@dataclass(frozen=True)
class SampleScore:
    """One sample's projections (activation units) and their difference."""

    index: int  # the sample's position in the data
    prompt: str
    response: str
    own_response: str  # the model's own answer to the prompt
    projection: float  # of the data's response
    own_projection: float
    diff: float  # projection - own_projection
    label: bool | None


@dataclass(frozen=True)
class TraitScreening:
    """One trait's screening: every scored sample (data order), the mean projection difference
    with a 95% bootstrap interval over samples, and (labelled data only) the AUROC of ranking
    the samples labelled true above the others by their difference and each label's mean."""

    trait: str
    layer: int
    hook_name: str
    rows: list[SampleScore]
    mean: Interval
    auroc: Interval | None

    def by_label(self) -> dict[bool, Interval]:
        """The mean difference of the samples labelled true and of those labelled false, each
        with its interval (a planted half's push, apart from the rest's); empty: no labels."""
        if self.auroc is None:
            return {}
        return {
            y: mean_interval([r.diff for r in self.rows if r.label is y]) for y in (True, False)
        }

    def ranked(self) -> list[SampleScore]:
        """The rows, largest difference (pushes the trait most) first."""
        return sorted(self.rows, key=lambda r: (-r.diff, r.index))


@dataclass(frozen=True)
class Screening:
    traits: dict[str, TraitScreening]
    generation: dict[str, Any]
    n_samples: int
    no_own_response: list[int]  # samples the model answered with nothing at once: not scored


def check_vectors(model: Model, vectors: dict[str, TraitVectors], layers: dict[str, int]) -> None:
    """One line when a trait's vectors come from another model, have another width, or lack
    the layer (before anything is generated)."""
    name = model.cfg.model_name
    for trait, tv in vectors.items():
        if tv.model and tv.model.lower() != name.lower():  # embedded names are lower-cased
            raise TLExtractError(
                f"the {trait} vectors were made on {tv.model}, not {name}: screen with the model "
                "they were extracted from."
            )
        check_fit(model, tv, [layers[trait]])


def prompt_text(tokenizer: Any, style: str, messages: Sequence[tuple[str, str]]) -> str:
    """The conversation as the model reads it before answering: a user turn (after an optional
    system message) as the pipeline renders its prompts, a longer one by the chat template."""
    roles = [role for role, _ in messages]
    if roles in (["user"], ["system", "user"]):
        instruction = messages[0][1] if len(messages) == 2 else ""
        return render_prompt(tokenizer, style, instruction, messages[-1][1])
    if style != "chat":
        raise TLExtractError(
            f"a conversation of {len(messages)} messages needs the chat template; "
            '"prompt_style": "completion" takes one user message (and a system message).'
        )
    chat = [{"role": r, "content": c} for r, c in messages]
    return tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)


def sample_ids(
    model: Model, samples: Sequence[Sample], style: str
) -> tuple[list[list[int]], list[list[int]]]:
    """Each sample's prompt ids (rendered in ``style``) and response ids (no special tokens);
    one line naming the sample whose response has no token."""
    tok = tokenizer_of(model)
    prompts = tokenize(tok, [prompt_text(tok, style, s.messages) for s in samples], style)
    responses = text_ids(model, [s.response for s in samples])
    for s, r in zip(samples, responses, strict=True):
        if not r:
            raise TLExtractError(f"{s.where}: the response has no token; drop the sample.")
    return prompts, responses


def own_responses(
    model: Model,
    prompt_ids: Sequence[list[int]],
    settings: GenerationSettings,
    seeds: Sequence[int],
    size: int,
    shards: Shards = in_memory,
) -> list[list[int]]:
    """The model's own response ids to each prompt, in batches of ``size`` (``shards``: saved
    and resumed by a stage, or kept in memory), generated as the pipeline generates."""
    meta = [{"polarity": "own", "index": i} for i in range(len(prompt_ids))]
    records, _ = generate_records(TLEngine(model), tokenizer_of(model), prompt_ids, meta, seeds,
                                  settings, size, shards, device_of(model), "screen: generate",
                                  None)  # fmt: skip
    return [r["response_ids"] for r in sorted(records, key=lambda r: r["index"])]


def score(
    model: Model,
    vectors: dict[str, TraitVectors],
    layers: dict[str, int],
    samples: Sequence[Sample],
    ids: tuple[list[list[int]], list[list[int]]],
    own: Sequence[list[int]],
    size: int,
    generation: dict[str, Any],
) -> Screening:
    """The projection differences of the samples whose own response is not empty, per trait."""
    prompts, responses = ids
    tok = tokenizer_of(model)
    own_text = tok.batch_decode(list(own), skip_special_tokens=True)
    # Read back from text as the data's responses are: a token sequence that does not survive
    # its own text (a rare split, a stray special token) would otherwise set the two apart.
    own = text_ids(model, own_text)
    keep = [i for i, o in enumerate(own) if o]
    empty = [i for i, o in enumerate(own) if not o]
    if empty:
        log.warning("screen: the model answered %d of %d prompts with nothing at once "
                    "(e.g. sample %d); those samples are not scored",
                    len(empty), len(own), empty[0])  # fmt: skip
    if not keep:
        raise TLExtractError(
            "screen: the model answered every prompt with nothing; no sample can be scored "
            "(raise max_new_tokens or check the prompts)."
        )
    hooks: dict[str, list[int]] = {}
    for t, tv in vectors.items():
        hooks.setdefault(tv.hook, []).append(layers[t])
    hooks = {h: sorted(set(ls)) for h, ls in hooks.items()}
    # The data's and the model's responses pooled together: one teacher-forced pass per batch.
    records = [
        {"polarity": side, "index": i, "prompt_ids": prompts[i], "response_ids": list(seqs[i]),
         "n_response_tokens": len(seqs[i])}
        for side, seqs in (("data", responses), ("own", own)) for i in keep
    ]  # fmt: skip
    acts = {
        hook: pool_records(model, records, Capture("two-stage", hook, tuple(ls)), size,
                           in_memory, device_of(model), f"screen: pool {hook}")
        for hook, ls in hooks.items()
    }  # fmt: skip
    out = {}
    for t, tv in vectors.items():
        name, unit = unit_direction(model, tv, layers[t])
        at = hooks[tv.hook].index(layers[t])
        pooled = {side: torch.stack([acts[tv.hook][side, i][at] for i in keep])
                  for side in ("data", "own")}  # fmt: skip
        proj, own_proj = (pooled[side].float() @ unit.cpu() for side in ("data", "own"))
        rows = [
            SampleScore(i, samples[i].prompt, samples[i].response, own_text[i], float(p),
                        float(q), float(p - q), samples[i].label)
            for i, p, q in zip(keep, proj, own_proj, strict=True)
        ]  # fmt: skip
        out[t] = TraitScreening(t, layers[t], name, rows, mean_interval([r.diff for r in rows]),
                                ranking_auroc(rows))  # fmt: skip
    return Screening(out, generation, len(samples), empty)


def ranking_auroc(rows: Sequence[SampleScore]) -> Interval | None:
    """AUROC of the differences for the samples labelled true against the others, with a 95%
    bootstrap interval over samples; None when the data carry no labels or only one kind."""
    labels = [r.label for r in rows]
    if None in labels or len(set(labels)) < 2:
        return None
    diffs = torch.tensor([r.diff for r in rows], dtype=torch.float64)
    y = torch.tensor(labels, dtype=torch.bool)
    return bootstrap_rows(diffs, y, list(range(len(rows))))["auroc"]


def screen(
    model: Model,
    vectors: Vectors,
    samples: Iterable[Sample | Mapping[str, Any]],
    layer: int | Mapping[str, int] | None = None,
    *,
    style: str = "chat",
    settings: GenerationSettings | None = None,
    seeds: Sequence[int] | None = None,
    batch_size: int = 8,
) -> Screening:
    """The projection difference of every sample on every trait, in memory.

    ``samples``: :class:`tlextract.screen_data.Sample` objects or rows as in a data file
    (``{"prompt", "response"}`` or ``{"messages": [...]}``, optional boolean ``label``).
    ``vectors``: one TraitVectors, a list (named by their trait) or a mapping trait ->
    TraitVectors; ``layer``: one block for all, a mapping per trait, or None for the middle of
    each trait's layers. The model's own responses are generated with ``settings`` (default:
    sampled at temperature 1, 40 tokens, as the pipeline generates); ``seeds[i]`` (default
    ``i``) decides sample i's."""
    items = as_samples(samples)
    by_trait = trait_vectors_by_name(vectors)
    layers = layer_per_trait(by_trait, layer)
    check_vectors(model, by_trait, layers)
    settings = settings or OWN_ANSWER
    seeds = list(range(len(items))) if seeds is None else list(seeds)
    if len(seeds) != len(items):
        raise TLExtractError(f"{len(seeds)} seeds for {len(items)} samples.")
    ids = sample_ids(model, items, style)
    own = own_responses(model, ids[0], settings, seeds, batch_size)
    return score(model, by_trait, layers, items, ids, own, batch_size, asdict(settings))
