"""The live page's model side: an experiment's saved mean_diff vectors on a model loaded once,
answering typed prompts with every token scored on every trait, steered or not
(:mod:`live_server` serves it).

Per trait the run is the experiment's default one when it has vectors, else the first run on
disk that has (:func:`tlextract.report.explorer.trait_runs`); its layer is the static explorer's
(:func:`tlextract.report.explorer.chosen_layer`). Answers are greedy with a fixed budget, so the
same request gives the same answer and steering on vs. off differs only by the steering.
Scores come from :func:`tlextract.ops.monitor.monitor`; a steered answer is the same call inside
:func:`tlextract.ops.steer.steer` at the steered trait's layer, with ``alpha`` in typical
residual norms (:func:`tlextract.ops.steer.residual_norm`, as ``steer`` and the sweep use).
Streamed, each token is handed on as soon as ``monitor`` has scored it (``on_token``).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from tlextract.config import Experiment, GenerationSettings
from tlextract.errors import TLExtractError
from tlextract.model.decoding import Model
from tlextract.model.tokens import tokenizer_of
from tlextract.monitoring.alarm import running_mean
from tlextract.ops.monitor import OnToken, TokenScores, monitor
from tlextract.ops.steer import residual_norm, steer, unit_direction
from tlextract.ops.trait_vectors import TraitVectors
from tlextract.report.explorer import chosen_layer, make_command, saved_alarm, trait_runs
from tlextract.settings import RunSettings, settings_for
from tlextract.stages.common import model_loader
from tlextract.steering.sweep import pole_means

STRENGTH = 2.0  # the slider's range: -STRENGTH..STRENGTH typical residual norms
MAX_PROMPT_CHARS = 2000
MAX_NEW_TOKENS = 40

Emit = Callable[[dict[str, Any]], None]  # one streamed event, as JSON


class BadRequest(TLExtractError):
    """A request the page should not have sent (HTTP 400), in one line."""


class Busy(TLExtractError):
    """Another generation is running (HTTP 409)."""


@dataclass
class Trait:
    """One trait as the live page uses it."""

    run: RunSettings
    vectors: TraitVectors
    layer: int
    layer_why: str
    scale: float  # the typical residual norm at ``layer``: the unit of the strength
    poles: dict[str, float] | None  # the colour scale's ends (report/monitor_view.py)
    alarm: dict[str, Any] | None  # the saved calibration.json entry, when there is one


def _vector_run(experiment: Experiment, trait: str, **overrides: Any) -> RunSettings:
    """The trait's default run if it has vectors, else its first run on disk that has."""
    default = settings_for(experiment, trait, **overrides)
    for run in [default, *trait_runs(experiment, [trait], **overrides)]:
        if (run.stage_dir("vectors") / "mean_diff.pt").exists():
            return run
    raise TLExtractError(
        f"no mean_diff vectors for trait {trait!r}: {make_command(default, 'run')}"
    )


def load_trait(
    model: Model, experiment: Experiment, trait: str, overrides: dict[str, Any]
) -> Trait:
    """``trait`` ready to score and steer; ``overrides`` as for :func:`settings_for`."""
    run = _vector_run(experiment, trait, **overrides)
    vectors = TraitVectors.load(run.stage_dir("vectors") / "mean_diff.pt")
    layer, why = chosen_layer(run, vectors)
    scale = residual_norm(model, layer, hook=vectors.hook)
    poles = pole_means(run, layer, unit_direction(model, vectors, layer)[1].cpu())
    return Trait(run, vectors, layer, why, scale, poles, saved_alarm(run))


@dataclass
class Live:
    """The loaded model and traits; :meth:`generate` answers one request at a time."""

    experiment: Experiment
    model: Model
    traits: dict[str, Trait]
    max_new_tokens: int = MAX_NEW_TOKENS
    lock: threading.Lock = field(default_factory=threading.Lock)

    def page_data(self) -> dict[str, Any]:
        """What the page needs before any answer: traits, layers, alarms, the slider's range."""
        return {
            "experiment": self.experiment.name,
            "model": self.traits[next(iter(self.traits))].run.model,
            "traits": list(self.traits),
            "layers": {t: {"layer": x.layer, "why": x.layer_why} for t, x in self.traits.items()},
            "alarms": {t: x.alarm for t, x in self.traits.items()},
            "poles": {t: x.poles for t, x in self.traits.items()},
            "strength": STRENGTH,
            "max_prompt_chars": MAX_PROMPT_CHARS,
            "max_new_tokens": self.max_new_tokens,
        }

    def settings(self) -> GenerationSettings:
        return GenerationSettings(max_new_tokens=self.max_new_tokens, do_sample=False)

    def answer(self, prompt: str, on_token: OnToken | None = None) -> TokenScores:
        """The greedy answer to ``prompt`` with every token scored on every trait;
        ``on_token`` streams it (:func:`tlextract.ops.monitor.monitor`)."""
        mon = monitor(
            self.model,
            [prompt],
            {t: x.vectors for t, x in self.traits.items()},
            {t: x.layer for t, x in self.traits.items()},
            style=self.experiment.prompt_style,
            settings=self.settings(),
            on_token=on_token,
        )
        return mon.texts[0]

    def steered(
        self, prompt: str, trait: str, strength: float, on_token: OnToken | None = None
    ) -> TokenScores:
        """:meth:`answer` with ``strength`` typical residual norms of ``trait`` added."""
        x = self.traits[trait]
        with steer(self.model, x.vectors, x.layer, strength, scale=x.scale):
            return self.answer(prompt, on_token)

    def generate(self, request: Any, emit: Emit | None = None) -> dict[str, Any]:
        """Answer a request (the JSON the page posts), unsteered and, when asked, steered;
        :class:`BadRequest` for bad input, :class:`Busy` while another request runs.

        ``emit`` streams: it gets ``{"event": "start", "answer": "unsteered"|"steered"}``
        before each answer, then ``{"event": "token", ...}`` for each of its tokens as soon as
        it is scored (:meth:`token_event`); the returned answers are the same tokens."""
        prompt, trait, strength = self.check(request)
        if not self.lock.acquire(blocking=False):
            raise Busy("another answer is being generated; try again when it is done.")
        try:
            with torch.inference_mode():
                unsteered = self.answer(prompt, self.stream("unsteered", emit))
                out = {"unsteered": self.to_json(unsteered), "steered": None}
                if trait is not None:
                    steered = self.steered(prompt, trait, strength, self.stream("steered", emit))
                    out["steered"] = {**self.to_json(steered), "trait": trait,
                                      "strength": strength}  # fmt: skip
            return out
        finally:
            self.lock.release()

    def stream(self, which: str, emit: Emit | None) -> OnToken | None:
        """The ``on_token`` that emits one answer's token events (None: no streaming)."""
        if emit is None:
            return None
        emit({"event": "start", "answer": which})
        so_far: dict[str, list[float]] = {t: [] for t in self.traits}

        def on_token(_: int, token_id: int, scores: dict[str, float]) -> None:
            for t, score in scores.items():
                so_far[t].append(score)
            emit(self.token_event(which, token_id, scores, so_far))

        return on_token

    def token_event(
        self, which: str, token_id: int, scores: dict[str, float], so_far: dict[str, list[float]]
    ) -> dict[str, Any]:
        """One streamed token: its text, id, scores and alarm flags (the windowed score of the
        answer so far: the alarm's window looks back only, so the flag is final)."""
        above = {t: self.above(t, s) for t, s in so_far.items()}
        return {
            "event": "token",
            "answer": which,
            "token": tokenizer_of(self.model).decode([token_id]),
            "token_id": token_id,
            "scores": scores,
            "above": {t: None if a is None else a[-1] for t, a in above.items()},
        }

    def check(self, request: Any) -> tuple[str, str | None, float]:
        """The prompt, the steered trait (None: no steering) and the strength, or BadRequest."""
        if not isinstance(request, dict):
            raise BadRequest("the request must be a JSON object.")
        prompt = request.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise BadRequest("the prompt is empty: type something to answer.")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise BadRequest(
                f"the prompt has {len(prompt)} characters; at most {MAX_PROMPT_CHARS}."
            )
        trait = request.get("steer")
        if trait is None:
            return prompt, None, 0.0
        if trait not in self.traits:
            raise BadRequest(f"unknown trait {trait!r}: steer one of {list(self.traits)}.")
        strength = request.get("strength")
        if (
            isinstance(strength, bool)
            or not isinstance(strength, int | float)
            or not math.isfinite(strength)
            or abs(strength) > STRENGTH
        ):
            raise BadRequest(
                f"strength {strength!r}: give a number from {-STRENGTH} to {STRENGTH}."
            )
        return prompt, trait, float(strength)

    def to_json(self, text: TokenScores) -> dict[str, Any]:
        """The answer's tokens with each trait's score and alarm flags (answer tokens only)."""
        answer = [i for i, p in enumerate(text.is_prompt) if not p]
        return {
            "text": text.answer,
            "stopped": text.stopped,
            "tokens": [text.tokens[i] for i in answer],
            "token_ids": [text.token_ids[i] for i in answer],
            "scores": {t: [s[i] for i in answer] for t, s in text.scores.items()},
            "above": {t: self.above(t, [s[i] for i in answer]) for t, s in text.scores.items()},
        }

    def above(self, trait: str, scores: Sequence[float]) -> list[bool] | None:
        """Per answer token: its (windowed) score above the saved alarm's threshold; None when
        the trait has no alarm at the layer shown (its threshold is for another direction)."""
        alarm = self.traits[trait].alarm
        if alarm is None or alarm.get("layer") != self.traits[trait].layer or not scores:
            return None
        window = alarm.get("figures", {}).get("formulation", {}).get("window", 1)
        windowed = running_mean(torch.tensor(scores, dtype=torch.float64)[:, None], window)
        return [s > alarm["threshold"] for s in windowed[:, 0].tolist()]


def load_live(
    experiment: Experiment,
    traits: Sequence[str],
    max_new_tokens: int = MAX_NEW_TOKENS,
    get_model: Callable[[], Model] | None = None,
    **overrides: Any,
) -> Live:
    """The model (loaded once, ``overrides`` as for :func:`settings_for`) and every trait."""
    names = list(traits)
    model = (get_model or model_loader(settings_for(experiment, names[0], **overrides)))()
    loaded = {t: load_trait(model, experiment, t, overrides) for t in names}
    return Live(experiment, model, loaded, max_new_tokens)
