"""``steer --auto``: the layer and strength that move the text most toward a pole while the model
stays fluent, chosen on one set of questions and reported on another, against a random
direction of the same norm at the same layer and strength.

* **Effect, without a judge**: a bag-of-words classifier trained on the trait's natural
  responses (pos vs neg, :func:`trait_classifier`) gives each answer a probability of the
  requested pole; the effect of a condition is its mean over questions minus the unsteered one
  (same questions, same seeds: a paired difference).
* **Fluency, without a judge**: the KL divergence of the steered model's next-token distribution
  from the unsteered one on neutral text (:mod:`tlextract.ops.fluency`), and the drop in
  log-probability per token of the steered answers under the unsteered model. Each has a bound;
  a candidate over either is never chosen, and at a layer whose KL passes the bound no stronger
  alpha is tried.
* **Honest report**: the chosen candidate, the unsteered model and the random direction answer
  the *report* questions (disjoint from the selection ones); shifts come with 95% bootstrap
  intervals over questions, and with a judge, its trait and coherence scores.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from tlextract.errors import TLExtractError
from tlextract.evaluation.surface import TextClassifier, TextScorer
from tlextract.judge.answers import JudgeCache, judge_responses
from tlextract.judge.base import Judge
from tlextract.model.decoding import Model
from tlextract.model.tokens import tokenizer_of, user_prompts
from tlextract.ops.bootstrap import Interval, mean_interval
from tlextract.ops.fluency import answer_logprob, answer_logprobs, kl_divergence, neutral_answers
from tlextract.ops.neutral import NEUTRAL_QUESTIONS
from tlextract.ops.steer import Positions, residual_norm, steer
from tlextract.ops.trait_vectors import TraitVectors
from tlextract.settings import RunSettings, settings_for
from tlextract.stages.responses import load_responses
from tlextract.steering.effects import QuestionEffects, question_effects
from tlextract.steering.sweep import generate_answers, held_out_questions, question_prompts
from tlextract.store import derive_seed

log = logging.getLogger(__name__)
ALPHAS = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.8)  # typical residual norms; signed by the pole
# Defaults from a grid on SmolLM2-135M (docs/results/steering.md): past KL 0.3 nats/token the
# steered answers fall by over 1 nat/token under the unsteered model and invent words.
MAX_KL = 0.3  # nats per answer token on neutral text
MAX_LOGPROB_DROP = 1.0  # nats per token, steered answers vs unsteered ones
N_QUESTIONS = 16  # per set: selection and report
N_LAYERS = 5


@dataclass(frozen=True)
class Candidate:
    layer: int
    alpha: float  # signed: positive adds the pos - neg direction
    kl: float  # mean KL(steered || unsteered) per neutral answer token, nats
    logprob_drop: float | None  # unsteered minus steered mean log-prob per token (None: not run)
    effect: float | None  # mean P(pole) of the steered answers minus the unsteered (None: not run)
    passed: bool
    why: str
    example: str | None = None  # the first steered answer, to read


@dataclass(frozen=True)
class Condition:
    """One condition on the report questions."""

    name: str  # "unsteered", "steered" or "random direction"
    p_pole: Interval  # mean classifier probability of the requested pole
    shift: Interval | None  # paired shift vs unsteered (None for unsteered)
    kl: float
    logprob: float | None
    trait: float | None  # judge's mean trait score (None: no judge)
    coherence: float | None
    answers: list[str]
    # Per question against the unsteered answers (None for unsteered): wrong-way share, every
    # trait's classifier shift, the fall in log-prob of neutral answers.
    effects: QuestionEffects | None = None


@dataclass(frozen=True)
class AutoSteer:
    experiment: str
    trait: str
    variant: str
    model: str
    pole: str
    max_kl: float
    max_logprob_drop: float
    classifier: str
    judge: str
    selection_questions: list[str]
    report_questions: list[str]
    candidates: list[Candidate]
    chosen: Candidate | None
    report: list[Condition]


@dataclass(frozen=True)
class _Setup:
    """Everything the candidates share."""

    model: Model
    run: RunSettings
    classifier: TextScorer
    pole: str
    prompts: list[list[int]]  # selection questions, rendered
    seeds: list[int]
    neutral: tuple[list[list[int]], list[list[int]]]
    base_logp: torch.Tensor  # unsteered log-probs on the neutral answers
    batch_size: int
    positions: Positions
    side_classifiers: Mapping[str, TextScorer]  # every trait's P(pos), for side effects


def trait_classifier(run: RunSettings) -> tuple[TextClassifier, str]:
    """A bag-of-words classifier of the trait's natural responses (the run's own, if none)."""
    natural = settings_for(run.experiment, run.trait.name, variant="natural", model=run.model)
    for source in (natural, run) if run.trait.natural is not None else (run,):
        try:
            responses, _ = load_responses(source)
        except TLExtractError:
            continue
        rows = [r for r in responses if r["response"].strip()]
        clf = TextClassifier([r["response"] for r in rows], [r["polarity"] == "pos" for r in rows])
        return clf, f"bag of words on {len(rows)} {source.variant} responses of {run.trait.name}"
    raise TLExtractError(
        f"steer --auto needs the trait's responses to train its text classifier; run python -m "
        f"tlextract run --experiment {run.experiment.name} --traits {run.trait.name} first."
    )


def side_classifiers(run: RunSettings) -> dict[str, TextScorer]:
    """Every trait of the experiment whose responses exist: its bag-of-words classifier."""
    out: dict[str, TextScorer] = {}
    for name in run.experiment.traits:
        other = settings_for(run.experiment, name, variant=run.variant, model=run.model)
        try:
            out[name] = trait_classifier(other)[0]
        except TLExtractError:  # that trait not extracted yet: no column for it
            log.info("[%s] no responses of %s: no side-effect column", run.trait.name, name)
    return out


def _p_pole(s: _Setup, texts: Sequence[str]) -> list[float]:
    p = s.classifier.prob_pos(texts)
    return p if s.pole == "pos" else [1 - x for x in p]


def _answers(s: _Setup, prompts: list[list[int]], seeds: list[int]) -> list[list[int]]:
    return generate_answers(s.model, prompts, s.run.experiment.generation, seeds, s.batch_size)


def _texts(s: _Setup, ids: list[list[int]]) -> list[str]:
    return tokenizer_of(s.model).batch_decode(ids, skip_special_tokens=True)


def _mean_logprob(s: _Setup, prompts: list[list[int]], ids: list[list[int]]) -> float | None:
    values = [x for x in answer_logprob(s.model, prompts, ids) if x is not None]
    return sum(values) / len(values) if values else None


def _kl(s: _Setup) -> float:
    return float(kl_divergence(answer_logprobs(s.model, *s.neutral), s.base_logp).mean())


def _try_layer(
    s: _Setup,
    vectors: TraitVectors,
    layer: int,
    alphas: Sequence[float],
    base: tuple[float, float | None],
    bounds: tuple[float, float],
) -> list[Candidate]:
    """Candidates at ``layer`` in order of strength, stopping after the first over the KL bound."""
    scale = residual_norm(s.model, layer, hook=vectors.hook)
    out = []
    for alpha in alphas:
        with steer(s.model, vectors, layer, alpha, s.positions, scale=scale):
            kl = _kl(s)
            if kl > bounds[0]:
                why = f"KL {kl:.3f} > {bounds[0]}; stronger alphas not tried"
                out.append(Candidate(layer, alpha, kl, None, None, False, why))
                log.info("[%s] L%d alpha %+g: %s", s.run.trait.name, layer, alpha, why)
                break
            ids = _answers(s, s.prompts, s.seeds)
        texts = _texts(s, ids)
        effect = sum(_p_pole(s, texts)) / len(ids) - base[0]
        lp = _mean_logprob(s, s.prompts, ids)
        drop = None if lp is None or base[1] is None else base[1] - lp
        ok = drop is not None and drop <= bounds[1]
        why = "within bounds" if ok else f"log-prob drop {drop} > {bounds[1]}"
        out.append(Candidate(layer, alpha, kl, drop, effect, ok, why, texts[0]))
        log.info("[%s] L%d alpha %+g: KL %.3f, log-prob drop %s, effect %+.3f", s.run.trait.name,
                 layer, alpha, kl, "n/a" if drop is None else f"{drop:.2f}", effect)  # fmt: skip
    return out


def default_layers(vectors: TraitVectors, preferred: int | None, n: int = N_LAYERS) -> list[int]:
    """``n`` layers spread over the middle 70% of the vectors' layers, plus ``preferred``."""
    ls = list(vectors.layers)
    picks = {ls[round((0.15 + 0.7 * i / max(n - 1, 1)) * (len(ls) - 1))] for i in range(n)}
    return sorted(picks | ({preferred} if preferred in ls else set()))


def _report(s: _Setup, vectors: TraitVectors, chosen: Candidate, questions: list[str],
            judge: Judge | None, cache: JudgeCache | None) -> list[Condition]:  # fmt: skip
    """Unsteered, steered and random-direction answers to the report questions."""
    prompts, seeds = question_prompts(s.model, s.run, questions)
    d_model = vectors.vectors.shape[-1]
    gen = torch.Generator().manual_seed(derive_seed(s.run.experiment.seed, "random direction"))
    random_dir = torch.randn(d_model, generator=gen)
    scale = residual_norm(s.model, chosen.layer, hook=vectors.hook)
    directions = {"unsteered": None, "steered": vectors, "random direction": random_dir}
    n_prompts = user_prompts(s.model, NEUTRAL_QUESTIONS, s.run.experiment.prompt_style)
    n_seeds = [derive_seed(s.run.experiment.seed, "neutral", q) for q in NEUTRAL_QUESTIONS]
    results: dict[str, tuple[list[str], list[float], float, float | None]] = {}
    neutral_lp: dict[str, list[float | None]] = {}
    for name, direction in directions.items():
        if direction is None:
            ids, kl = _answers(s, prompts, seeds), 0.0
            n_ids = _answers(s, n_prompts, n_seeds)
        else:
            with steer(s.model, direction, chosen.layer, chosen.alpha, s.positions, scale=scale,
                       hook=vectors.hook):  # fmt: skip
                ids, kl = _answers(s, prompts, seeds), _kl(s)
                n_ids = _answers(s, n_prompts, n_seeds)
        texts = _texts(s, ids)
        results[name] = (texts, _p_pole(s, texts), kl, _mean_logprob(s, prompts, ids))
        neutral_lp[name] = answer_logprob(s.model, n_prompts, n_ids)  # read by the unsteered model
    base = results["unsteered"][1]
    out = []
    for name, (texts, p, kl, lp) in results.items():
        effects = None if name == "unsteered" else question_effects(
            base, p, s.side_classifiers, (results["unsteered"][0], texts),
            (neutral_lp["unsteered"], neutral_lp[name]),
        )  # fmt: skip
        trait = coherence = None
        if judge is not None:
            verdicts = judge_responses(
                judge, s.run.trait.eval_prompt, questions, texts, cache=cache
            )
            trait = _mean([v.trait for v in verdicts])
            coherence = _mean([v.coherence for v in verdicts])
        shift = (
            None
            if name == "unsteered"
            else mean_interval([a - b for a, b in zip(p, base, strict=True)])
        )
        out.append(
            Condition(name, mean_interval(p), shift, kl, lp, trait, coherence, texts, effects)
        )
    return out


def _mean(values: Sequence[float | None]) -> float | None:
    xs = [x for x in values if x is not None]
    return sum(xs) / len(xs) if xs else None


def auto_steer(
    model: Model,
    run: RunSettings,
    vectors: TraitVectors,
    pole: str = "pos",
    *,
    layers: Sequence[int] | None = None,
    preferred_layer: int | None = None,
    alphas: Sequence[float] = ALPHAS,
    max_kl: float = MAX_KL,
    max_logprob_drop: float = MAX_LOGPROB_DROP,
    n_questions: int = N_QUESTIONS,
    positions: Positions = "all",
    judge: Judge | None = None,
    judge_cache: JudgeCache | None = None,
    batch_size: int = 16,
    classifier: TextScorer | None = None,
    others: Mapping[str, TextScorer] | None = None,
) -> AutoSteer:
    # long: the whole selection in order; each step is one call
    """Choose the layer and alpha (see the module docstring) and report them. ``alphas`` are
    magnitudes in typical residual norms, tried weakest first; ``pole`` is "pos" or "neg".
    ``classifier`` replaces the bag-of-words one trained on the trait's responses; ``others``
    (trait -> classifier of its pos pole) the experiment's, for the side effects."""
    if pole not in ("pos", "neg"):
        raise TLExtractError(f"pole={pole!r}: use pos or neg.", parameters=("pole",))
    if max_kl <= 0 or max_logprob_drop <= 0 or not alphas or min(alphas) <= 0:
        raise TLExtractError(
            "max_kl=, max_logprob_drop= and alphas= must be positive.",
            parameters=("max_kl", "max_logprob_drop", "alphas"),
        )
    source = "given by the caller"
    if classifier is None:
        classifier, source = trait_classifier(run)
    questions, _ = held_out_questions(run, 2 * n_questions)
    if len(questions) < 2:
        raise TLExtractError(f"{run.trait.name}: steer --auto needs at least 2 questions.")
    random.Random(run.experiment.seed).shuffle(questions)
    half = len(questions) // 2
    selection, held = questions[:half], questions[half:]
    neutral = neutral_answers(model, run.experiment.prompt_style)
    s = _Setup(
        model, run, classifier, pole, *question_prompts(model, run, selection),
        neutral, answer_logprobs(model, *neutral), batch_size, positions,
        side_classifiers(run) if others is None else others,
    )  # fmt: skip
    ids = _answers(s, s.prompts, s.seeds)
    base = (sum(_p_pole(s, _texts(s, ids))) / len(ids), _mean_logprob(s, s.prompts, ids))
    sign = 1.0 if pole == "pos" else -1.0
    candidates = [
        c
        for layer in (layers or default_layers(vectors, preferred_layer))
        for c in _try_layer(
            s, vectors, layer, [sign * a for a in sorted(alphas)], base, (max_kl, max_logprob_drop)
        )  # fmt: skip
    ]
    passed = [c for c in candidates if c.passed and c.effect is not None]
    chosen = max(passed, key=lambda c: (c.effect, -abs(c.alpha), -c.layer), default=None)
    report = _report(s, vectors, chosen, held, judge, judge_cache) if chosen is not None else []
    return AutoSteer(
        experiment=run.experiment.name, trait=run.trait.name, variant=run.variant,
        model=run.model, pole=pole, max_kl=max_kl, max_logprob_drop=max_logprob_drop,
        classifier=source, judge=judge.name if judge is not None else "none",
        selection_questions=selection, report_questions=held, candidates=candidates,
        chosen=chosen, report=report,
    )  # fmt: skip
