"""tlextract: trait vectors from contrastive prompts with TransformerLens.

Everything a notebook needs, at one level::

    import tlextract as tx
    exp = tx.load_experiment("smollm2_cognitive")
    run = tx.settings_for(exp, "local_global", n_examples=8)
    vectors = tx.run_trait(run)          # generate -> judge -> activations -> mean_diff vectors
    vectors[16], vectors.hook_name(16)   # direction at block 16, "blocks.16.hook_resid_post"
    cv = tx.cross_validate(run)          # nested CV: figures with 95% intervals, baselines, nulls
    cv.get("mean_diff").auroc, cv.layer["mean_diff"]
    model = tx.load_model(exp.model)
    auto = tx.auto_steer(model, run, vectors)   # layer and alpha within fluency bounds
    with tx.steer(model, vectors, auto.chosen.layer, alpha=auto.chosen.alpha):
        ...
    tx.restore(model)                    # stock TransformerLens again; tx.accelerate(model) undoes
"""

import importlib
from typing import Any

from tlextract.config import Experiment, GenerationSettings, experiments_root, load_experiment
from tlextract.errors import TLExtractError
from tlextract.evaluation.crossval import CrossValidation, cross_validate
from tlextract.evaluation.evaluate import TraitEvaluation, cross_evaluate, evaluate_trait
from tlextract.model.accel import accelerate, decode_session, is_accelerated, restore
from tlextract.model.load import load_model
from tlextract.model.tokens import tokenize
from tlextract.monitoring.alarm import Alarm
from tlextract.monitoring.alarm_data import monitor_alarm
from tlextract.monitoring.calibrate import Calibration, best_threshold, calibrate
from tlextract.ops.bootstrap import Interval, bootstrap
from tlextract.ops.generate import generate_batch
from tlextract.ops.monitor import Monitoring, TokenScores, monitor
from tlextract.ops.pool import hook_name, pooled_activations
from tlextract.ops.steer import ablate, residual_norm, steer
from tlextract.ops.trait_vectors import TraitVectors
from tlextract.settings import RunSettings, report_dir, settings_for
from tlextract.stages.activations import Activations, extract_activations, load_activations
from tlextract.stages.common import model_loader
from tlextract.stages.extract import Extraction, extract
from tlextract.stages.judge import load_selection, select_responses
from tlextract.stages.responses import generate_responses, load_responses
from tlextract.stages.run import run_trait
from tlextract.stages.vectors import extract_vectors
from tlextract.steering.autosteer import AutoSteer, auto_steer
from tlextract.steering.sweep import Sweep, alpha_sweep, pole_means
from tlextract.traits import Trait, load_trait, render_prompt

# Rendering imports matplotlib (a second): loaded when first used, so the CLI and the stages
# start without it.
_RENDERING = {
    "build_report": "tlextract.report.summary",
    "plot_autosteer": "tlextract.report.autosteer_view",
    "plot_intervals": "tlextract.report.trust",
    "plot_heatmap": "tlextract.report.monitor_view",
    "plot_metrics": "tlextract.report.plots",
    "plot_projections": "tlextract.report.plots",
    "plot_sweep": "tlextract.report.sweep_view",
    "sweep_table": "tlextract.report.sweep_view",
    "token_html": "tlextract.report.monitor_view",
}


def __getattr__(name: str) -> Any:
    if name in _RENDERING:
        return getattr(importlib.import_module(_RENDERING[name]), name)
    raise AttributeError(f"module 'tlextract' has no attribute {name!r}")


__all__ = [
    "Activations",
    "Alarm",
    "AutoSteer",
    "Calibration",
    "CrossValidation",
    "Experiment",
    "Extraction",
    "GenerationSettings",
    "Interval",
    "Monitoring",
    "RunSettings",
    "Sweep",
    "TLExtractError",
    "TokenScores",
    "Trait",
    "TraitEvaluation",
    "TraitVectors",
    "ablate",
    "accelerate",
    "alpha_sweep",
    "auto_steer",
    "best_threshold",
    "bootstrap",
    "build_report",
    "calibrate",
    "monitor_alarm",
    "cross_evaluate",
    "cross_validate",
    "decode_session",
    "evaluate_trait",
    "experiments_root",
    "extract",
    "extract_activations",
    "extract_vectors",
    "generate_batch",
    "generate_responses",
    "hook_name",
    "is_accelerated",
    "load_activations",
    "load_experiment",
    "load_model",
    "load_responses",
    "load_selection",
    "load_trait",
    "model_loader",
    "monitor",
    "plot_autosteer",
    "plot_heatmap",
    "plot_intervals",
    "plot_metrics",
    "plot_projections",
    "plot_sweep",
    "pole_means",
    "pooled_activations",
    "render_prompt",
    "report_dir",
    "residual_norm",
    "restore",
    "run_trait",
    "select_responses",
    "settings_for",
    "steer",
    "sweep_table",
    "token_html",
    "tokenize",
]
