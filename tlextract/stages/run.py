"""One trait run: the stages, each declared once in its module (a :class:`Stage` naming its
key, compute, save and load functions) and listed here in order, run by the one runner
(:func:`tlextract.stages.stage.run_stage`), each skipped when its output is up to date.

Each stage writes into ``experiments/<exp>/<trait>/extraction/<stage>/`` and finishes by writing
``meta.json`` with a fingerprint of everything its output depends on (its key). A rerun with the
same settings skips the stage; a changed setting recomputes that stage and the ones after it.
While a stage runs, each batch is saved as a shard, so an interrupted run resumes at the first
missing batch. The computation inside the stages is :mod:`tlextract.stages.compute`'s, the one
``tx.extract`` runs in memory.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from typing import Any

import torch
from transformers import AutoConfig

from tlextract.engines.registry import engine_identity, starts_server
from tlextract.errors import TLExtractError, during
from tlextract.locks import run_lock
from tlextract.model.load import check_model_name, model_directory
from tlextract.ops.pool import resolve_layers
from tlextract.ops.trait_vectors import TraitVectors
from tlextract.settings import STAGES, RunSettings
from tlextract.stages.activations import ACTIVATIONS
from tlextract.stages.common import model_loader
from tlextract.stages.judge import JUDGE
from tlextract.stages.responses import RESPONSES
from tlextract.stages.stage import GetModel, Stage, run_stage, up_to_date
from tlextract.stages.vectors import VECTORS

PIPELINE: tuple[Stage[Any], ...] = (RESPONSES, JUDGE, ACTIVATIONS, VECTORS)
BY_NAME = {s.name: s for s in PIPELINE}
assert tuple(BY_NAME) == STAGES, "settings.STAGES names the stages in PIPELINE order"


def is_done(run: RunSettings, name: str) -> bool:
    """Whether stage ``name`` is up to date with these settings (and the stages it reads)."""
    return up_to_date(BY_NAME[name], run)


def layer_count(model: str) -> int:
    """The model's number of blocks, read from its config: no weights are loaded (a managed vLLM
    server may start next and wants the accelerator's memory)."""
    try:
        config = AutoConfig.from_pretrained(model_directory(model), local_files_only=True)
    except (OSError, ValueError) as e:
        raise TLExtractError(f"could not read the config of {model}: {e}") from e
    # TransformerLens' n_layers is the HF config's num_hidden_layers (n_layer etc. map onto it).
    return int(config.get_text_config().num_hidden_layers)


def starts_vllm_server(run: RunSettings, stages: Sequence[str]) -> bool:
    """Whether running ``stages`` starts a vLLM server for the responses stage. It asks for most
    of the GPU, so a caller that keeps a model across runs drops it first (:func:`release`)."""
    return starts_server(run.engine) and "responses" in stages and not is_done(run, "responses")


def release() -> None:
    """Free what dropped models held: a model caught in a reference cycle goes only at a
    collection, and CUDA keeps freed blocks reserved until emptied."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_trait(
    run: RunSettings,
    stages: Sequence[str] = STAGES,
    get_model: GetModel | None = None,
    *,
    wait: bool = True,
) -> TraitVectors | None:
    """Run the given stages of one trait in order; returns the vectors when that stage ran.

    One process at a time writes a trait run: another run of it waits for this one to finish,
    or with ``wait=False`` raises TLExtractError naming the holder. Nothing here loads the model
    before the responses stage; a caller passing a ``get_model`` that already holds one drops it
    first when :func:`starts_vllm_server`."""
    get_model = get_model or model_loader(run)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise TLExtractError(f"unknown stage {unknown[0]!r}; stages: {', '.join(STAGES)}.")
    source = check_model_name(run.model, run.model_backend)
    if "responses" in stages:
        if source.adapter is not None and starts_server(run.engine):
            raise TLExtractError(
                f"{run.model} is a LoRA adapter, merged only when tlextract loads it: a vLLM "
                "server would serve its base model. Use engine='tl', or save the merged model "
                "(peft's merge_and_unload, then save_pretrained) and pass that directory",
                parameters=("engine",),
            )
        engine_identity(run.engine)  # vLLM installed, or its server reachable: before any file
    if "activations" in stages and run.layers != "all" and not is_done(run, "activations"):
        # Fail on impossible layers before any stage (or the lock) writes a file.
        resolve_layers(run.layers, layer_count(run.model))
    with run_lock(run.out_dir, wait=wait):
        got: dict[str, Any] = {}
        for stage in PIPELINE:
            if stage.name in stages:
                what = f"[{run.trait.name}] {stage.name}"
                if stage.name == "judge":
                    what += " (answered judge calls are cached)"
                with during(what):
                    got[stage.name] = run_stage(stage, run, get_model, got)
        return got.get("vectors")
