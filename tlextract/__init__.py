"""tlextract: trait vectors from contrastive prompts with TransformerLens.

Everything a notebook needs, at one level::

    import tlextract as tx
    exp = tx.load_experiment("smollm2_cognitive")
    run = tx.settings_for(exp, "local_global", n_examples=8)
    vectors = tx.run_trait(run)          # generate -> judge -> activations -> mean_diff vectors
    vectors[16], vectors.hook_name(16)   # direction at block 16, "blocks.16.hook_resid_post"
    ev = tx.evaluate_trait(run)          # held-out accuracy, AUROC, Cohen's d per layer
    model = tx.load_model(exp.model)
    with tx.steer(model, vectors, 16, alpha=0.5):
        ...
"""

import importlib
from typing import Any

from tlextract.analysis.calibrate import Calibration, best_threshold, calibrate
from tlextract.analysis.evaluate import TraitEvaluation, cross_evaluate, evaluate_trait
from tlextract.analysis.sweep import Sweep, alpha_sweep, pole_means
from tlextract.config import Experiment, GenerationSettings, experiments_root, load_experiment
from tlextract.errors import TLExtractError
from tlextract.model.fast import decode_session
from tlextract.model.load import load_model
from tlextract.model.tokens import tokenize
from tlextract.ops.generate import generate_batch
from tlextract.ops.monitor import Monitoring, TokenScores, monitor
from tlextract.ops.pool import hook_name, pooled_activations
from tlextract.ops.steer import ablate, residual_norm, steer
from tlextract.ops.vectors import TraitVectors
from tlextract.settings import RunSettings, report_dir, settings_for
from tlextract.stages.activations import Activations, extract_activations, load_activations
from tlextract.stages.common import model_loader
from tlextract.stages.generate import generate_responses, load_responses
from tlextract.stages.judge import load_selection, select_responses
from tlextract.stages.run import run_trait
from tlextract.stages.vectors import extract_vectors
from tlextract.traits import Trait, load_trait, render_prompt

# Rendering imports matplotlib (a second): loaded when first used, so the CLI and the stages
# start without it.
_RENDERING = {
    "build_report": "tlextract.report.summary",
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
    "Calibration",
    "Experiment",
    "GenerationSettings",
    "Monitoring",
    "RunSettings",
    "Sweep",
    "TLExtractError",
    "TokenScores",
    "Trait",
    "TraitEvaluation",
    "TraitVectors",
    "ablate",
    "alpha_sweep",
    "best_threshold",
    "build_report",
    "calibrate",
    "cross_evaluate",
    "decode_session",
    "evaluate_trait",
    "experiments_root",
    "extract_activations",
    "extract_vectors",
    "generate_batch",
    "generate_responses",
    "hook_name",
    "load_activations",
    "load_experiment",
    "load_model",
    "load_responses",
    "load_selection",
    "load_trait",
    "model_loader",
    "monitor",
    "plot_heatmap",
    "plot_metrics",
    "plot_projections",
    "plot_sweep",
    "pole_means",
    "pooled_activations",
    "render_prompt",
    "report_dir",
    "residual_norm",
    "run_trait",
    "select_responses",
    "settings_for",
    "steer",
    "sweep_table",
    "token_html",
    "tokenize",
]
