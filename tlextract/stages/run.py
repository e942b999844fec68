"""One trait run: the stages in order, each skipped when its output is up to date.

Each stage writes into ``experiments/<exp>/<trait>/extraction/<stage>/`` and finishes by writing
``meta.json`` with a fingerprint of everything its output depends on. A rerun with the same
settings skips the stage; a changed setting recomputes that stage and the ones after it. While a
stage runs, each batch is saved as a shard, so an interrupted run resumes at the first missing
batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from transformer_lens import HookedTransformer

from tlextract.engines.base import engine_identity
from tlextract.errors import TLExtractError, during
from tlextract.judge.keep import Selection
from tlextract.locks import run_lock
from tlextract.model.load import check_model_name
from tlextract.ops.pool import resolve_layers
from tlextract.ops.vectors import TraitVectors
from tlextract.settings import STAGES, RunSettings
from tlextract.stages.activations import (
    Activations,
    activations_done,
    extract_activations,
    load_activations,
)
from tlextract.stages.common import model_loader
from tlextract.stages.generate import generate_responses
from tlextract.stages.judge import load_selection, select_responses
from tlextract.stages.vectors import extract_vectors


def run_trait(
    run: RunSettings,
    stages: Sequence[str] = STAGES,
    get_model: Callable[[], HookedTransformer] | None = None,
    *,
    wait: bool = True,
) -> TraitVectors | None:
    """Run the given stages of one trait in order; returns the vectors when that stage ran.

    One process at a time writes a trait run: another run of it waits for this one to finish,
    or with ``wait=False`` raises TLExtractError naming the holder."""
    get_model = get_model or model_loader(run)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise TLExtractError(f"unknown stage {unknown[0]!r}; stages: {', '.join(STAGES)}.")
    check_model_name(run.model)
    if "generate" in stages:
        engine_identity(run.engine)  # vLLM installed, or its server reachable: before any file
    if "activations" in stages and run.layers != "all" and not activations_done(run):
        # Fail on impossible layers before any stage (or the lock) writes a file.
        resolve_layers(run.layers, get_model().cfg.n_layers)
    with run_lock(run.out_dir, wait=wait):
        acts: Activations | None = None
        selection: Selection | None = None
        vectors = None
        name = f"[{run.trait.name}]"
        if "generate" in stages:
            with during(f"{name} generate"):
                generate_responses(run, get_model)
        if "judge" in stages:
            with during(f"{name} judge (answered judge calls are cached)"):
                selection = select_responses(run, get_model)
        if "activations" in stages:
            with during(f"{name} activations"):
                acts = extract_activations(run, get_model)
        if "vectors" in stages:
            with during(f"{name} vectors"):
                vectors = extract_vectors(
                    run, acts or load_activations(run), selection or load_selection(run)
                )
        return vectors
