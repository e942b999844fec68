"""Stage 4, vectors: one direction per layer from the pooled activations of the kept examples."""

from __future__ import annotations

import logging

from jaxtyping import Float
from torch import Tensor

from tlextract.judge.keep import Selection
from tlextract.ops import methods
from tlextract.ops.trait_vectors import TraitVectors
from tlextract.settings import RunSettings
from tlextract.stages.activations import Activations, current_activations_key
from tlextract.stages.common import reuse, stage_meta
from tlextract.stages.judge import load_selection
from tlextract.store import META, fingerprint, write_json

log = logging.getLogger(__name__)


def vectors_key(activations_fp: str, kept: dict[str, list[int]], method: str) -> str:
    return fingerprint({"activations": activations_fp, "kept": kept, "method": method})


def current_vectors_key(run: RunSettings, method: str = "mean_diff") -> str:
    """The key vectors of these settings have (reads the judge stage's kept examples)."""
    return vectors_key(current_activations_key(run), load_selection(run).kept, method)


def extract_vectors(
    run: RunSettings, acts: Activations, selection: Selection, method: str = "mean_diff"
) -> TraitVectors:
    stage = run.stage_dir("vectors")
    key = vectors_key(acts.key, selection.kept, method)
    path = stage / f"{method}.pt"
    done = reuse(stage, key, lambda: TraitVectors.load(path), f"[{run.trait.name}] vectors")
    if done is not None:
        log.info("[%s] vectors: up to date, skipped (%s)", run.trait.name, path)
        if not path.with_suffix(".safetensors").exists():  # a run from before it was written
            done.save_safetensors(path.with_suffix(".safetensors"))
        return done
    pos, neg = (
        kept_rows(a, idx, selection.kept[p])
        for a, idx, p in ((acts.pos, acts.pos_index, "pos"), (acts.neg, acts.neg_index, "neg"))
    )
    vecs = methods.run_method(method, pos, neg)
    judge = {k: selection.summary[k] for k in ("judge", "kept", "mean_score")}
    norms = [round(float(n), 6) for n in vecs.norm(dim=-1)]
    tv = TraitVectors(
        trait=run.trait.name, method=method, model=run.model, hook=acts.hook, layers=acts.layers,
        vectors=vecs,
        metadata={"experiment": run.experiment.name, "variant": run.variant,
                  "n_pos": pos.shape[0], "n_neg": neg.shape[0], "norms": norms,
                  "activations_fingerprint": acts.key, "fingerprint": key, **judge},
    )  # fmt: skip
    tv.save(path)
    tv.save_safetensors(path.with_suffix(".safetensors"))  # the portable copy
    write_json(stage / META, stage_meta(
        "vectors", key, run, method=method, layers=list(acts.layers), hook=acts.hook,
        hook_names=[tv.hook_name(layer) for layer in acts.layers],
        counts={"pos": pos.shape[0], "neg": neg.shape[0]}, norms=norms, **judge,
    ))  # fmt: skip
    log.info("[%s] vectors: %s for %d layers from %d pos / %d neg -> %s", run.trait.name, method,
             len(acts.layers), pos.shape[0], neg.shape[0], path)  # fmt: skip
    return tv


def kept_rows(
    acts: Float[Tensor, "n layer d_model"], index: list[int], keep: list[int]
) -> Float[Tensor, "k layer d_model"]:
    """The rows of kept examples (an empty response has no activation row and is never kept)."""
    where = {ix: row for row, ix in enumerate(index)}
    return acts[[where[i] for i in keep]]
