"""tlextract: trait vectors from contrastive prompts with TransformerLens.

The notebook's story, at one level::

    import tlextract as tx
    exp = tx.load_experiment("smollm2_cognitive")
    run = tx.settings_for(exp, "local_global", n_examples=8)
    vectors = tx.run_trait(run)          # responses -> judge -> activations -> mean_diff vectors
    vectors[16], vectors.hook_name(16)   # direction at block 16, "blocks.16.hook_resid_post"
    cv = tx.cross_validate(run)          # nested CV: figures with 95% intervals, baselines, nulls
    cv.get("mean_diff").auroc, cv.layer["mean_diff"]
    model = tx.load_model(exp.model)
    auto = tx.auto_steer(model, run, vectors)   # layer and alpha within fluency bounds
    with tx.steer(model, vectors, auto.chosen.layer, alpha=auto.chosen.alpha):
        ...
    tx.vector_tokens(model, vectors, cv.layer["mean_diff"]).promoted   # its logit lens
    vectors.save("trait.gguf", format="gguf")   # or "pt", "safetensors", "persona_vectors"
    tx.restore(model)                    # stock TransformerLens again; tx.accelerate(model) undoes
    tuned = tx.load_model("path/to/fine-tune")  # the same tokens through a fine-tune of it
    tx.compare(model, tuned, vectors, prompt_ids, response_ids).intervals("local_global")

The top level holds one name per step of that story, and only those: load (``load_experiment``,
``settings_for``, ``load_model``), extract (``extract`` in memory, ``run_trait`` cached on disk),
evaluate (``cross_validate``: the figures to quote; ``evaluate_trait``, ``cross_evaluate``: the
one-split and cross-variant tables), steer (``steer``, ``ablate``, ``auto_steer``,
``alpha_sweep``), monitor (``monitor``, ``calibrate``, ``monitor_alarm``), put them to work
(``screen``: each training sample's projection difference from the model's own answer;
``compare``: each trait's projection shift from a base to its fine-tune, per layer and token),
the vectors (``TraitVectors``: save and load in every format; ``vector_tokens``: the tokens one
promotes and suppresses), speed (``accelerate``, ``restore``, ``is_accelerated``) and the one
error type (``TLExtractError``). Every model-running function takes the model first. Below that:

- ``tx.plots``: every plot and rendered page (matplotlib is imported when one is first used);
- ``tx.ops``: the low-level helpers on a loaded model or on tensors (generation, pooling,
  tokenising, bootstrap, residual norms);
- the stages (``tlextract.stages.*``) and the result types in the modules that return them.
"""

from tlextract import ops as ops  # the second level: tx.ops, tx.plots
from tlextract import plots as plots
from tlextract.config import load_experiment
from tlextract.errors import TLExtractError
from tlextract.evaluation.crossval import cross_validate
from tlextract.evaluation.evaluate import cross_evaluate, evaluate_trait
from tlextract.model.accel import accelerate, is_accelerated, restore
from tlextract.model.load import load_model
from tlextract.monitoring.alarm_data import monitor_alarm
from tlextract.monitoring.calibrate import calibrate
from tlextract.ops.monitor import monitor
from tlextract.ops.steer import ablate, steer
from tlextract.ops.trait_vectors import TraitVectors
from tlextract.ops.vector_tokens import vector_tokens
from tlextract.settings import settings_for
from tlextract.stages.compare import compare
from tlextract.stages.extract import extract
from tlextract.stages.run import run_trait
from tlextract.stages.screening import screen
from tlextract.steering.autosteer import auto_steer
from tlextract.steering.sweep import alpha_sweep

# ``ops`` and ``plots`` are the second level: attributes, not part of the one-level story.
__all__ = [
    "TLExtractError",
    "TraitVectors",
    "ablate",
    "accelerate",
    "alpha_sweep",
    "auto_steer",
    "calibrate",
    "compare",
    "cross_evaluate",
    "cross_validate",
    "evaluate_trait",
    "extract",
    "is_accelerated",
    "load_experiment",
    "load_model",
    "monitor",
    "monitor_alarm",
    "restore",
    "run_trait",
    "screen",
    "settings_for",
    "steer",
    "vector_tokens",
]
