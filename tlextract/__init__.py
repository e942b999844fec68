"""tlextract: trait vectors from contrastive prompts with TransformerLens.

Notebook use::

    import tlextract as tx
    exp = tx.load_experiment("smollm2_cognitive")
    run = tx.settings_for(exp, "local_global", n_examples=8)
    vectors = tx.run_trait(run)          # generate -> activations -> mean_diff vectors
    vectors[16], vectors.hook_name(16)   # direction at block 16, "blocks.16.hook_resid_post"
"""

from tlextract.config import Experiment, load_experiment
from tlextract.errors import TLExtractError
from tlextract.model.load import load_model
from tlextract.ops.generate import generate_batch
from tlextract.ops.monitor import Monitoring, TokenScores, monitor
from tlextract.ops.pool import hook_name, pooled_activations
from tlextract.ops.steer import ablate, residual_norm, steer
from tlextract.ops.vectors import TraitVectors
from tlextract.settings import RunSettings, settings_for
from tlextract.stages.activations import Activations, extract_activations, load_activations
from tlextract.stages.common import model_loader
from tlextract.stages.generate import generate_responses, load_responses
from tlextract.stages.run import run_trait
from tlextract.stages.vectors import extract_vectors
from tlextract.traits import Trait, load_trait

__all__ = [
    "Activations",
    "Experiment",
    "Monitoring",
    "RunSettings",
    "TLExtractError",
    "TokenScores",
    "Trait",
    "TraitVectors",
    "ablate",
    "extract_activations",
    "extract_vectors",
    "generate_batch",
    "generate_responses",
    "hook_name",
    "load_activations",
    "load_experiment",
    "load_model",
    "load_responses",
    "load_trait",
    "model_loader",
    "monitor",
    "pooled_activations",
    "residual_norm",
    "run_trait",
    "settings_for",
    "steer",
]
