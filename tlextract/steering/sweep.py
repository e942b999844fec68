"""Causal check of a trait vector: steer held-out questions at several strengths (and ablate the
direction), then measure what the model wrote.

For every condition (each ``alpha`` of :func:`tlextract.ops.steer.steer`, plus one
:func:`tlextract.ops.steer.ablate`) the same questions are answered with the same per-question
seeds, so conditions differ only by the intervention. Each answer gets:

* ``projection``: the *unsteered* model re-reads question + answer (teacher-forced, no hook) and
  the residual at the steered layer's hook, averaged over the answer's tokens, is projected on the
  unit trait vector. The added vector itself is not in it, only its effect on the text: how
  trait-like the answer reads to the model, on the scale of the extraction's examples
  (``poles``: mean projection of its pos and neg examples, pooled the same way). No judge needed.
* ``logprob`` (mean log-probability per answer token under the unsteered model) and ``distinct``
  (fraction of distinct tokens): judge-free signs of a broken model, which rambles or repeats.
* ``trait`` and ``coherence`` from the experiment's judge, when there is one (None when the judge
  put too little probability on the numbers 0-100: reported as the missing fraction).

The questions are the trait's ``questions`` that the extraction run did not use, asked with no
instruction (:func:`held_out_questions` says which it used).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from statistics import mean, stdev
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from tlextract.config import GenerationSettings
from tlextract.errors import TLExtractError
from tlextract.judge.answers import JudgeCache, judge_responses
from tlextract.judge.base import Judge
from tlextract.model.decoding import Model, teacher_forced
from tlextract.model.tokens import device_of, tokenizer_of, user_prompts
from tlextract.ops.fluency import mean_logprobs
from tlextract.ops.generate import generate_batch
from tlextract.ops.pool import pack
from tlextract.ops.steer import (
    Positions,
    ablate,
    residual_norm,
    steer,
    unit_direction,
)
from tlextract.ops.trait_vectors import TraitVectors
from tlextract.settings import RunSettings
from tlextract.stages.activations import load_activations
from tlextract.stages.responses import load_responses
from tlextract.stages.run import is_done
from tlextract.store import derive_seed
from tlextract.traits import POLARITIES

log = logging.getLogger(__name__)
DEFAULT_ALPHAS = (-1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0)


def held_out_questions(run: RunSettings, n: int) -> tuple[list[str], str]:
    """Up to ``n`` of the trait's questions that the run's responses do not contain, and a
    sentence saying where they come from."""
    if n < 1:
        raise TLExtractError(
            f"n_questions must be at least 1 (got {n}).", parameters=("n_questions",)
        )
    try:
        used, found = set(load_responses(run)[0]["question"]), True
    except TLExtractError:  # no responses of these settings
        used, found = set(), False
    unused = [q for q in run.trait.questions if q not in used]
    if not unused:
        return list(run.trait.questions[:n]), (
            f"all {len(run.trait.questions)} questions were used by the extraction (with their "
            f"instructions); the first {min(n, len(run.trait.questions))} are asked here without "
            "an instruction"
        )
    source = (
        f"{len(unused)} of {len(run.trait.questions)} questions are not in the "
        "extraction's responses"
        if found
        else "no extraction responses found, so no question counts as used"
    )
    return unused[:n], f"{source}; the first {min(n, len(unused))} asked, without instruction"


def pole_means(
    run: RunSettings, layer: int, unit: Float[Tensor, " d_model"]
) -> dict[str, float] | None:
    """Mean projection of the extraction's pos and neg examples (response-averaged activations
    at ``layer``) on ``unit``; None when the run has no current activations at that layer."""
    if not is_done(run, "activations"):
        return None
    acts = load_activations(run)
    if layer not in acts.layers:
        return None
    column = acts.layers.index(layer)
    return {pol: float((getattr(acts, pol)[:, column] @ unit.cpu()).mean()) for pol in POLARITIES}


@torch.inference_mode()
def reread(
    model: Model,
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    name: str,
    unit: Float[Tensor, " d_model"],
) -> tuple[list[float], list[float]]:
    """Per answer (non-empty), from one teacher-forced pass of the model as it is (run it outside
    any intervention): mean projection of ``name``'s output on ``unit`` over the answer tokens,
    and the answer's mean log-probability per token."""
    tokens, attn, response = pack(
        prompt_ids, response_ids, tokenizer_of(model).pad_token_id, device_of(model)
    )
    out, acts = teacher_forced(model, tokens, attn, [name], logits=True)
    assert out is not None
    weights = response.float()
    proj = ((acts[name].float() @ unit) * weights).sum(1) / weights.sum(1)
    logprobs = mean_logprobs(out, tokens, response)
    return proj.tolist(), [float(x) for x in logprobs if x is not None]


@dataclass(frozen=True)
class Answer:
    intervention: str  # "steer" or "ablate"
    alpha: float
    question: str
    seed: int
    response: str
    n_tokens: int
    projection: float | None  # None for an empty answer
    logprob: float | None
    distinct: float | None
    trait: float | None = None  # judge scores; None: no judge, or missing
    coherence: float | None = None


@dataclass(frozen=True)
class Condition:
    """Summary of one intervention over all questions: means and standard errors."""

    intervention: str
    alpha: float
    n: int
    n_empty: int
    projection: float | None
    projection_sem: float | None
    logprob: float | None
    distinct: float | None
    trait: float | None
    trait_sem: float | None
    trait_missing: float | None  # fraction of answers without a judge score (None: no judge)
    coherence: float | None
    coherence_missing: float | None


@dataclass(frozen=True)
class Sweep:
    experiment: str
    trait: str
    variant: str
    model: str
    method: str
    layer: int
    hook_name: str
    positions: str
    scale: float
    scale_definition: str
    questions: list[str]
    questions_source: str
    generation: dict[str, Any]
    judge: str
    poles: dict[str, float] | None
    conditions: list[Condition]
    answers: list[Answer]


def _measure(
    model: Model,
    kind: str,
    alpha: float,
    questions: Sequence[str],
    seeds: Sequence[int],
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[list[int]],
    name: str,
    unit: Float[Tensor, " d_model"],
    batch_size: int,
) -> list[Answer]:
    """The judge-free measures of one condition's answers (an empty answer has none)."""
    filled = [i for i, ids in enumerate(response_ids) if ids]
    measured: dict[int, tuple[float, float]] = {}
    for start in range(0, len(filled), batch_size):
        rows = filled[start : start + batch_size]
        projections, logprobs = reread(
            model, [prompt_ids[i] for i in rows], [response_ids[i] for i in rows], name, unit
        )
        measured |= dict(zip(rows, zip(projections, logprobs, strict=True), strict=True))
    texts = tokenizer_of(model).batch_decode(list(response_ids), skip_special_tokens=True)
    answers = []
    for i, (q, seed, ids) in enumerate(zip(questions, seeds, response_ids, strict=True)):
        projection, logprob = measured.get(i, (None, None))
        answers.append(
            Answer(
                intervention=kind,
                alpha=alpha,
                question=q,
                seed=seed,
                response=texts[i],
                n_tokens=len(ids),
                projection=projection,
                logprob=logprob,
                distinct=len(set(ids)) / len(ids) if ids else None,
            )
        )
    return answers


def _stats(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    xs = [x for x in values if x is not None]
    if not xs:
        return None, None
    return mean(xs), (stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else None)


def _missing(values: Sequence[float | None], judged: bool) -> float | None:
    return sum(v is None for v in values) / len(values) if judged else None


def _summarise(intervention: str, alpha: float, answers: list[Answer], judged: bool) -> Condition:
    projection, projection_sem = _stats([a.projection for a in answers])
    trait, trait_sem = _stats([a.trait for a in answers])
    return Condition(
        intervention=intervention,
        alpha=alpha,
        n=len(answers),
        n_empty=sum(a.n_tokens == 0 for a in answers),
        projection=projection,
        projection_sem=projection_sem,
        logprob=_stats([a.logprob for a in answers])[0],
        distinct=_stats([a.distinct for a in answers])[0],
        trait=trait,
        trait_sem=trait_sem,
        trait_missing=_missing([a.trait for a in answers], judged),
        coherence=_stats([a.coherence for a in answers])[0],
        coherence_missing=_missing([a.coherence for a in answers], judged),
    )


def question_prompts(
    model: Model, run: RunSettings, questions: Sequence[str]
) -> tuple[list[list[int]], list[int]]:
    """The questions as user prompts in the experiment's style, and one seed per question,
    shared by every condition of a steering comparison: they differ only by the intervention."""
    seeds = [derive_seed(run.experiment.seed, run.trait.name, "steer", q) for q in questions]
    return user_prompts(model, questions, run.experiment.prompt_style), seeds


def generate_answers(
    model: Model,
    prompt_ids: list[list[int]],
    gen: GenerationSettings,
    seeds: list[int],
    batch_size: int,
) -> list[list[int]]:
    return [
        g.response_ids
        for i in range(0, len(prompt_ids), batch_size)
        for g in generate_batch(model, prompt_ids[i : i + batch_size], gen,
                                seeds[i : i + batch_size])
    ]  # fmt: skip


def alpha_sweep(
    model: Model,
    run: RunSettings,
    vectors: TraitVectors,
    layer: int,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    n_questions: int = 8,
    *,
    positions: Positions = "all",
    ablation: bool = True,
    judge: Judge | None = None,
    judge_cache: JudgeCache | None = None,
    batch_size: int = 8,
) -> Sweep:
    # long: one loop over the conditions; the options alone take 14 lines of signature
    """Answer ``n_questions`` held-out questions under each steering strength in ``alphas``
    (and with the direction ablated), ``batch_size`` at a time with the experiment's
    generation settings, and measure the answers (see the module docstring). The judge, if any,
    runs after every intervention has ended."""
    name, unit = unit_direction(model, vectors, layer)
    scale = residual_norm(model, layer, hook=vectors.hook)
    questions, source = held_out_questions(run, n_questions)
    gen = run.experiment.generation
    prompt_ids, seeds = question_prompts(model, run, questions)
    conditions = [("steer", float(a)) for a in alphas] + ([("ablate", 0.0)] if ablation else [])
    answers: list[Answer] = []
    for kind, alpha in conditions:
        intervention = (
            steer(model, vectors, layer, alpha, positions, scale=scale)
            if kind == "steer"
            else ablate(model, vectors, layer, positions)
        )
        with intervention:
            responses = generate_answers(model, prompt_ids, gen, seeds, batch_size)
        answers += _measure(model, kind, alpha, questions, seeds, prompt_ids, responses, name,
                            unit, batch_size)  # fmt: skip
        projection = _stats([a.projection for a in answers[-len(questions) :]])[0]
        log.info("[%s] %s: mean projection %s", run.trait.name,
                 f"alpha {alpha:+g}" if kind == "steer" else "ablated",
                 "n/a" if projection is None else f"{projection:.2f}")  # fmt: skip
    if judge is not None:
        verdicts = judge_responses(
            judge,
            run.trait.eval_prompt,
            [a.question for a in answers],
            [a.response for a in answers],
            cache=judge_cache,
        )
        answers = [
            replace(a, trait=v.trait, coherence=v.coherence)
            for a, v in zip(answers, verdicts, strict=True)
        ]
    n = len(questions)
    return Sweep(
        experiment=run.experiment.name, trait=run.trait.name, variant=run.variant,
        model=run.model, method=vectors.method, layer=layer, hook_name=name,
        positions=positions, scale=scale,
        scale_definition="median L2 norm of the hook output over the tokens of "
        "tlextract.ops.steer.REFERENCE_TEXTS; steering adds alpha * scale * unit vector",
        questions=questions, questions_source=source, generation=asdict(gen),
        judge=judge.name if judge is not None else "none", poles=pole_means(run, layer, unit),
        conditions=[_summarise(kind, alpha, answers[k * n : (k + 1) * n], judge is not None)
                    for k, (kind, alpha) in enumerate(conditions)],
        answers=answers,
    )  # fmt: skip
