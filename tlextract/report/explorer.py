"""What the explorer page shows, gathered from what the runs saved (:mod:`explorer_page` draws it).

Every trait run of the experiment that exists on disk (both variants, both engines: the
``extraction[-natural][-vllm]`` directories of :func:`tlextract.settings.trait_dir`) gets its
``report/crossval.json`` (computed now by :func:`layer_for` when absent, as the result card
does), the responses ranked on the vector at the chosen layer with per-token scores
(:mod:`explorer_tokens`), ``steer/auto.json``, the alarm in ``monitor*/calibration.json`` and
``report/vector_tokens.json`` and its comparisons with fine-tunes (``compare``); the experiment
adds its cosine matrices, side-effect tables and screened datasets (``screen``).
What is missing comes with the command that makes it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tlextract.config import ENGINE_KINDS, Experiment
from tlextract.errors import TLExtractError
from tlextract.evaluation.crossval import HEADLINE, layer_for, load_crossval, verdict
from tlextract.model.decoding import Model
from tlextract.ops.trait_vectors import TraitVectors
from tlextract.ops.vector_tokens import vector_tokens
from tlextract.report.explorer_page import write_page
from tlextract.report.explorer_tokens import ranked_responses
from tlextract.report.explorer_uses import comparisons, screens
from tlextract.report.lens_view import LENS_FILE, K
from tlextract.settings import (
    RunSettings,
    experiment_report_dir,
    monitor_dir,
    report_dir,
    settings_for,
    steer_dir,
)
from tlextract.stages.common import model_loader
from tlextract.stages.run import is_done
from tlextract.store import read_json
from tlextract.traits import VARIANTS

log = logging.getLogger(__name__)


def make_command(run: RunSettings, target: str) -> str:
    """The make line that fills ``target`` for ``run`` (its variant and engine named)."""
    parts = [f"make {target}" if target != "run" else "make", f"experiment={run.experiment.name}",
             f"trait={run.trait.name}"]  # fmt: skip
    if run.variant != run.experiment.variant:
        parts.append(f"variant={run.variant}")
    if run.engine.kind != run.experiment.engine.kind:
        parts.append(f"engine={run.engine.kind}")
    return " ".join(parts)


def trait_runs(
    experiment: Experiment, traits: Sequence[str], **overrides: Any
) -> list[RunSettings]:
    """Each trait's runs on disk (every variant and engine), and its default run when none is."""
    runs = []
    for trait in traits:
        found = [
            run
            for variant in VARIANTS
            for engine in ENGINE_KINDS
            if (
                run := settings_for(experiment, trait, variant=variant, engine=engine, **overrides)
            ).out_dir.is_dir()  # fmt: skip
        ]
        runs += found or [settings_for(experiment, trait, **overrides)]
    return runs


def _crossval(run: RunSettings) -> dict[str, Any] | None:
    """The saved crossval.json as it is, with its verdict sentence beside it."""
    path = report_dir(run) / "crossval.json"
    if not path.exists():
        return None
    cv = load_crossval(path)
    method = HEADLINE if HEADLINE in cv.beats_baseline else next(iter(cv.layer))
    return {**read_json(path), "verdict": verdict(cv, method), "verdict_method": method}


def saved_alarm(run: RunSettings) -> dict[str, Any] | None:
    """This trait's entry in the monitor's saved calibration.json (an Alarm or a Calibration)."""
    path = monitor_dir(run) / "calibration.json"
    saved: dict[str, Any] = read_json(path) if path.exists() else {}
    entry = saved.get(run.trait.name)
    return None if entry is None else {"file": str(path), **entry}


def _optional(path: Path) -> Any:
    return read_json(path) if path.exists() else None


def chosen_layer(run: RunSettings, vectors: TraitVectors) -> tuple[int, str]:
    """The layer the page shows ``run`` at, and why (the live page uses the same)."""
    try:  # the one rule steer and monitor use (the report's cross-validated layer)
        return layer_for(run, vectors)
    except TLExtractError as e:  # too few examples to cross-validate: the middle layer, said
        return vectors.layers[len(vectors.layers) // 2], f"middle of the layers ({e})"


def run_view(run: RunSettings, get_model: Callable[[], Model]) -> dict[str, Any]:
    """Everything the page shows of one trait run, and the commands for what is missing."""
    view: dict[str, Any] = {
        "id": f"{run.trait.name}/{run.variant}/{run.engine.kind}", "trait": run.trait.name,
        "variant": run.variant, "engine": run.engine.kind, "dir": str(run.out_dir),
        "missing": {},
    }  # fmt: skip
    missing = view["missing"]
    vectors_path = run.stage_dir("vectors") / "mean_diff.pt"
    if not (vectors_path.exists() and is_done(run, "judge") and is_done(run, "activations")):
        missing["run"] = f"no vectors yet: {make_command(run, 'run')}"
        return view
    vectors = TraitVectors.load(vectors_path)
    view["layer"], view["layer_why"] = chosen_layer(run, vectors)
    view["crossval"] = _crossval(run)
    if view["crossval"] is None:
        missing["crossval"] = f"no cross-validation: {make_command(run, 'report')}"
    view["ranking"] = ranked_responses(get_model(), run, vectors, view["layer"])
    view["alarm"] = saved_alarm(run)
    if view["alarm"] is None:
        missing["alarm"] = (
            f"no alarm: python -m tlextract monitor --experiment {run.experiment.name} "
            f'--traits {run.trait.name} --variant {run.variant} --prompt "..."'
        )
    view["steering"] = _optional(steer_dir(run) / "auto.json")
    if view["steering"] is None:
        missing["steering"] = f"no steering run: {make_command(run, 'steer')}"
    view["comparisons"] = comparisons(run)
    if not view["comparisons"]:
        missing["compare"] = (
            f"no fine-tune compared: python -m tlextract compare --experiment "
            f"{run.experiment.name} --traits {run.trait.name} --variant {run.variant} "
            "--other MODEL_B"
        )
    view["vector_tokens"] = _optional(report_dir(run) / LENS_FILE)
    if view["vector_tokens"] is None:  # the model is loaded already: seconds, not a command
        lens = vector_tokens(get_model(), vectors, view["layer"], K)
        view["vector_tokens"] = {**lens.to_json(), "layer_rule": view["layer_why"]}
    return view


def experiment_view(experiment: Experiment, model: str | None = None) -> dict[str, Any]:
    """The experiment's saved cosine matrices and side-effect tables, per variant."""
    out = experiment_report_dir(experiment, model)
    cosines = [{"file": str(p), **read_json(p)} for p in sorted(out.glob("cosine_*.json"))]
    side = {p.stem.removeprefix("side_effects_"): read_json(p)
            for p in sorted(out.glob("side_effects_*.json"))}  # fmt: skip
    missing = {}
    if not (found := screens(experiment)):
        missing["screens"] = (
            f"no dataset screened: python -m tlextract screen --experiment {experiment.name} "
            "--data FILE.jsonl"
        )
    if not cosines:
        missing["cosines"] = f"no cosine matrix: make report experiment={experiment.name}"
    if not side:
        missing["side_effects"] = f"no side-effect table: make steer experiment={experiment.name}"
    return {"cosines": cosines, "side_effects": side, "screens": found, "missing": missing}


def explorer_data(
    experiment: Experiment,
    traits: Sequence[str],
    get_model: Callable[[], Model],
    **overrides: Any,
) -> dict[str, Any]:
    """The page's data: the experiment's views and one view per trait run."""
    runs = trait_runs(experiment, traits, **overrides)
    views = []
    for run in runs:
        log.info("[%s] explorer: %s %s", run.trait.name, run.variant, run.engine.kind)
        views.append(run_view(run, get_model))
    return {
        "experiment": experiment.name,
        "model": runs[0].model,
        "traits": list(traits),
        "runs": views,
        **experiment_view(experiment, overrides.get("model")),
    }


def build_explorer(
    experiment: Experiment, traits: Sequence[str] | None = None, **overrides: Any
) -> Path:
    """Gather and write ``<experiment report dir>/explorer.html``; ``overrides`` (model,
    model_backend, device, dtype) go to :func:`settings_for`. Returns the page's path."""
    names = list(traits or experiment.traits)
    get_model = model_loader(settings_for(experiment, names[0], **overrides))
    data = explorer_data(experiment, names, get_model, **overrides)
    return write_page(
        data, experiment_report_dir(experiment, overrides.get("model")) / "explorer.html"
    )
