"""Per-token monitoring: while the model writes, project every token's residual on trait vectors.

:func:`monitor` generates answers with :func:`tlextract.ops.generate.generate_batch` (batched, KV
cache, one seeded generator per prompt) while a hook at each needed hook point records, for every
row of every forward pass, the projection of the residual on the unit vector of each trait. The
prompt pass gives the prompt tokens' scores, each decode step the score of the token it reads, so
token ``i`` of the final text gets the residual *at* token ``i``: what ``run_with_cache`` on the
final text gives (tested). Scores are in activation units along the unit vector, as in
:func:`tlextract.ops.metrics.project`.

Finished rows leave the batch in :func:`generate_batch` (in order), so which prompt a row of a
decode step belongs to follows from the answer lengths; every step's batch size is checked against
that. The last token of an answer that ran out of budget is never read back during generation, so
the loop runs one step longer than asked and drops the extra token: each answer token has its
score, and answers equal those of a run with the asked budget (one seeded generator per prompt).

Run inside :func:`tlextract.ops.steer.steer` to watch a steered model; a steering hook at the same
hook point was registered first, so the scores include the added vector.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from functools import partial
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from tlextract.config import GenerationSettings
from tlextract.errors import TLExtractError
from tlextract.model.decoding import Model
from tlextract.model.tokens import tokenizer_of, user_prompts
from tlextract.ops.generate import Generation, generate_batch
from tlextract.ops.steer import unit_direction
from tlextract.ops.trait_vectors import TraitVectors

# Streaming: prompt index, answer token id, its score per trait.
OnToken = Callable[[int, int, dict[str, float]], None]


@dataclass(frozen=True)
class TokenScores:
    """One prompt and its answer, token by token; every list has one entry per token."""

    prompt: str  # the text as given, before the chat template
    token_ids: list[int]
    tokens: list[str]  # each token decoded on its own
    is_prompt: list[bool]  # True for the prompt's tokens (chat template included)
    scores: dict[str, list[float]]  # trait -> projection at each token
    stopped: bool  # an end-of-turn token ended the answer (it is not part of the text)

    def __post_init__(self) -> None:
        lengths = {len(self.tokens), len(self.is_prompt), *map(len, self.scores.values())}
        if lengths != {len(self.token_ids)}:
            raise ValueError(
                f"tokens and scores do not line up: {lengths} vs {len(self.token_ids)} tokens"
            )

    @property
    def answer(self) -> str:
        return "".join(t for t, p in zip(self.tokens, self.is_prompt, strict=True) if not p)


@dataclass(frozen=True)
class Monitoring:
    traits: list[str]
    layers: dict[str, int]
    hook_names: dict[str, str]
    generation: dict[str, object]
    texts: list[TokenScores]


def trait_vectors_by_name(
    vectors: Mapping[str, TraitVectors] | Sequence[TraitVectors] | TraitVectors,
) -> dict[str, TraitVectors]:
    if isinstance(vectors, TraitVectors):
        vectors = [vectors]
    items = (
        list(vectors.items())
        if isinstance(vectors, Mapping)
        else [(tv.trait, tv) for tv in vectors]
    )
    names = [name for name, _ in items]
    if not items or len(set(names)) != len(names):
        raise TLExtractError(f"trait vectors need distinct names; got {names}.")
    return dict(items)


def layer_per_trait(
    vectors: dict[str, TraitVectors], layer: int | Mapping[str, int] | None
) -> dict[str, int]:
    """None: the middle of each trait's layers; an int: that layer for all; a mapping: per trait."""
    if layer is None:
        return {t: tv.layers[len(tv.layers) // 2] for t, tv in vectors.items()}
    if isinstance(layer, int):
        return dict.fromkeys(vectors, layer)
    unknown = sorted(set(layer) - set(vectors))
    missing = sorted(set(vectors) - set(layer))
    if unknown or missing:
        raise TLExtractError(
            f"layer per trait: unknown trait(s) {unknown}, no layer for "
            f"{missing}; the traits are {sorted(vectors)}."
        )
    return dict(layer)


class _Recorder:
    """Forward hooks that keep, for every forward pass, each row's projections on the units of
    the traits read at that hook: ``passes[hook][k]`` is ``[batch, pos, trait]``."""

    def __init__(self, units: dict[str, Float[Tensor, "trait d_model"]]):
        self.units = units
        self.passes: dict[str, list[Tensor]] = {name: [] for name in units}

    def hooks(self) -> list[tuple[str | Callable[..., Any], Callable[..., Any]]]:
        def record(name: str) -> Callable[..., None]:
            def hook(resid: Float[Tensor, "batch pos d_model"], hook: object) -> None:
                # Kept on the device: a copy to the host here would wait for every step.
                self.passes[name].append(resid.float() @ self.units[name].T)

            return hook

        return [(name, record(name)) for name in self.units]


def _per_token(
    passes: list[Tensor], prompt_ids: Sequence[Sequence[int]], gens: Sequence[Generation]
) -> list[Float[Tensor, "token trait"]]:
    """Each prompt's scores at its prompt tokens (from the prompt pass, padding dropped) and its
    answer tokens (answer token k is read by decode step k + 1)."""
    prompt_pass, steps = passes[0], passes[1:]
    # How many decode steps read each row's tokens: all of an answer an end token stopped; all
    # but the last of one that ran out of budget.
    fed = [len(g.response_ids) - (0 if g.stopped else 1) for g in gens]
    if len(steps) != max(fed, default=0):
        raise RuntimeError(
            f"monitor: {len(steps)} decode steps for answers that need "
            f"{max(fed, default=0)}; generate_batch changed how it drops rows"
        )
    answers: list[list[Tensor]] = [[] for _ in gens]
    for s, step in enumerate(steps, start=1):
        alive = [r for r, n in enumerate(fed) if n >= s]
        if step.shape[0] != len(alive):
            raise RuntimeError(
                f"monitor: decode step {s} has {step.shape[0]} rows, expected "
                f"{len(alive)}; generate_batch changed how it drops rows"
            )
        for j, r in enumerate(alive):
            answers[r].append(step[j, 0])
    width = prompt_pass.shape[1]
    empty = prompt_pass.new_zeros(0, prompt_pass.shape[-1])
    return [
        torch.cat(
            [prompt_pass[r, width - len(ids) :], torch.stack(answers[r]) if answers[r] else empty]
        )
        for r, ids in enumerate(prompt_ids)
    ]


class _Stream:
    """Hands each answer token and its scores to ``on_token`` as soon as both exist: the token
    sampled at decode step s is read, and so scored, by step s + 1, so each step completes the
    previous step's tokens of the rows still in the batch (a stop token leaves it unscored)."""

    def __init__(
        self, recorder: _Recorder, traits: dict[str, list[str]], on_token: OnToken, first: int
    ) -> None:
        self.recorder, self.traits, self.on_token, self.first = recorder, traits, on_token, first
        self.sampled: dict[int, int] = {}  # row -> its token of the step before

    def __call__(self, rows: list[int], new: Tensor) -> None:
        if self.sampled:  # the prompt pass scores no answer token
            # Streaming costs one more read of the device per step; without it there is none.
            read = {name: p[-1][:, 0].tolist() for name, p in self.recorder.passes.items()}
            for j, r in enumerate(rows):
                scores = {
                    t: read[name][j][k]
                    for name, ts in self.traits.items()
                    for k, t in enumerate(ts)
                }
                self.on_token(self.first + r, self.sampled[r], scores)
        self.sampled = dict(zip(rows, new.tolist(), strict=True))


def _generate_scored(
    model: Model,
    prompt_ids: Sequence[Sequence[int]],
    settings: GenerationSettings,
    seeds: Sequence[int],
    units: dict[str, Float[Tensor, "trait d_model"]],
    stream: Callable[[_Recorder], _Stream] | None = None,
) -> list[tuple[Generation, dict[str, Float[Tensor, "token trait"]]]]:
    """Generate one batch with the recorder on; answers trimmed to ``settings.max_new_tokens``.
    ``stream``: makes the per-step callback that hands out tokens as they are scored."""
    recorder = _Recorder(units)
    one_more = replace(settings, max_new_tokens=settings.max_new_tokens + 1)
    on_step = None if stream is None else stream(recorder)
    with model.hooks(fwd_hooks=recorder.hooks()):
        gens = generate_batch(model, prompt_ids, one_more, seeds, on_step=on_step)
    scored = {
        name: _per_token([x.cpu() for x in p], prompt_ids, gens)
        for name, p in recorder.passes.items()
    }
    budget = settings.max_new_tokens
    out = []
    for r, (ids, g) in enumerate(zip(prompt_ids, gens, strict=True)):
        kept = Generation(g.response_ids[:budget], g.stopped and len(g.response_ids) < budget)
        n = len(ids) + len(kept.response_ids)
        out.append((kept, {name: scores[r][:n] for name, scores in scored.items()}))
    return out


def _text(
    tok: Any,
    prompt: str,
    n_prompt: int,
    token_ids: list[int],
    scores: dict[str, list[float]],
    stopped: bool,
) -> TokenScores:
    return TokenScores(
        prompt=prompt,
        token_ids=token_ids,
        tokens=tok.batch_decode([[t] for t in token_ids]),
        is_prompt=[i < n_prompt for i in range(len(token_ids))],
        scores=scores,
        stopped=stopped,
    )


def monitor(
    model: Model,
    prompts: Sequence[str],
    vectors: Mapping[str, TraitVectors] | Sequence[TraitVectors] | TraitVectors,
    layer: int | Mapping[str, int] | None = None,
    *,
    style: Literal["chat", "completion"] = "chat",
    settings: GenerationSettings | None = None,
    seeds: Sequence[int] | None = None,
    batch_size: int = 8,
    on_token: OnToken | None = None,
) -> Monitoring:
    """Answer each prompt and score every token (prompt and answer) on every trait.

    ``prompts`` are user messages, put into the chat template (``style="chat"``) or into
    ``Q: ...\\nA:`` text (``"completion"``) with no instruction. ``vectors``: trait vectors,
    as a mapping trait -> TraitVectors or a list (named by their trait). ``layer``: one block
    for every trait, a mapping trait -> block, or None for the middle of each trait's layers.
    ``settings`` default to 40 sampled tokens at temperature 1; ``seeds[i]`` (default ``i``)
    alone decides prompt i's samples, whatever its batch. ``on_token(i, token_id, scores)``
    streams: it gets each answer token of prompt i with its score per trait as soon as the
    token is scored, before the answer is done (the same floats the returned texts hold)."""
    if not prompts:
        raise TLExtractError("monitor needs at least one prompt.")
    by_trait = trait_vectors_by_name(vectors)
    layers = layer_per_trait(by_trait, layer)
    directions = {t: unit_direction(model, tv, layers[t]) for t, tv in by_trait.items()}
    hook_names = {t: name for t, (name, _) in directions.items()}
    groups = {name: [t for t in by_trait if hook_names[t] == name] for name in hook_names.values()}
    units = {name: torch.stack([directions[t][1] for t in ts]) for name, ts in groups.items()}
    settings = settings or GenerationSettings()
    seeds = list(range(len(prompts))) if seeds is None else list(seeds)
    if len(seeds) != len(prompts):
        raise TLExtractError(f"{len(seeds)} seeds for {len(prompts)} prompts.")
    tok = tokenizer_of(model)
    ids = user_prompts(model, prompts, style)
    texts = []
    for start in range(0, len(prompts), batch_size):
        chunk = slice(start, start + batch_size)
        stream = None
        if on_token is not None:
            stream = partial(_Stream, traits=groups, on_token=on_token, first=start)
        for p, prompt_ids, (gen, scored) in zip(
            prompts[chunk],
            ids[chunk],
            _generate_scored(model, ids[chunk], settings, seeds[chunk], units, stream),
            strict=True,
        ):
            token_ids = [*prompt_ids, *gen.response_ids]
            scores = {
                t: scored[name][:, groups[name].index(t)].tolist() for t, name in hook_names.items()
            }
            texts.append(_text(tok, p, len(prompt_ids), token_ids, scores, gen.stopped))
    return Monitoring(list(by_trait), layers, hook_names, asdict(settings), texts)
