"""Stage 4, vectors: one direction per layer from the pooled activations of the kept examples."""

from __future__ import annotations

import logging
from typing import Any

from jaxtyping import Float
from torch import Tensor

from tlextract.judge.keep import Selection
from tlextract.ops import methods
from tlextract.ops.trait_vectors import TraitVectors
from tlextract.settings import RunSettings
from tlextract.stages.activations import ACTIVATIONS, Activations, current_activations_key
from tlextract.stages.common import model_loader
from tlextract.stages.judge import JUDGE, load_selection
from tlextract.stages.stage import Job, Stage, run_stage
from tlextract.store import fingerprint

log = logging.getLogger(__name__)
METHOD = "mean_diff"  # the pipeline's; evaluation fits the others


def vectors_key(activations_fp: str, kept: dict[str, list[int]], method: str) -> str:
    return fingerprint({"activations": activations_fp, "kept": kept, "method": method})


def current_vectors_key(run: RunSettings) -> str:
    """The key vectors of these settings have (reads the judge stage's kept examples)."""
    return vectors_key(current_activations_key(run), load_selection(run).kept, METHOD)


def compute_vectors(job: Job) -> TraitVectors:
    run, acts, selection = job.run, job.inputs["activations"], job.inputs["judge"]
    pos, neg = (
        kept_rows(a, idx, selection.kept[p])
        for a, idx, p in ((acts.pos, acts.pos_index, "pos"), (acts.neg, acts.neg_index, "neg"))
    )
    vecs = methods.run_method(METHOD, pos, neg)
    judge = {k: selection.summary[k] for k in ("judge", "kept", "mean_score")}
    norms = [round(float(n), 6) for n in vecs.norm(dim=-1)]
    return TraitVectors(
        trait=run.trait.name, method=METHOD, model=run.model, hook=acts.hook, layers=acts.layers,
        vectors=vecs,
        metadata={"experiment": run.experiment.name, "variant": run.variant,
                  "n_pos": pos.shape[0], "n_neg": neg.shape[0], "norms": norms,
                  "activations_fingerprint": acts.key, "fingerprint": job.key, **judge},
    )  # fmt: skip


def save_vectors(job: Job, tv: TraitVectors) -> dict[str, Any]:
    path = job.dir / f"{tv.method}.pt"
    tv.save(path)
    tv.save_safetensors(path.with_suffix(".safetensors"))  # the portable copy
    meta = tv.metadata
    log.info("[%s] vectors: %s for %d layers from %d pos / %d neg -> %s", tv.trait, tv.method,
             len(tv.layers), meta["n_pos"], meta["n_neg"], path)  # fmt: skip
    return dict(
        method=tv.method, layers=list(tv.layers), hook=tv.hook,
        hook_names=[tv.hook_name(layer) for layer in tv.layers],
        counts={"pos": meta["n_pos"], "neg": meta["n_neg"]}, norms=meta["norms"],
        **{k: meta[k] for k in ("judge", "kept", "mean_score")},
    )  # fmt: skip


def read_vectors(run: RunSettings, key: str) -> TraitVectors:
    path = run.stage_dir("vectors") / f"{METHOD}.pt"
    vectors = TraitVectors.load(path)
    if not path.with_suffix(".safetensors").exists():  # a run from before it was written
        vectors.save_safetensors(path.with_suffix(".safetensors"))
    return vectors


VECTORS: Stage[TraitVectors] = Stage(
    "vectors", (JUDGE, ACTIVATIONS), "mean_diff.pt, mean_diff.safetensors",
    key=current_vectors_key, compute=compute_vectors, save=save_vectors, load=read_vectors,
)  # fmt: skip


def extract_vectors(run: RunSettings, acts: Activations, selection: Selection) -> TraitVectors:
    """Run the vectors stage alone on these activations and kept examples."""
    return run_stage(VECTORS, run, model_loader(run), {"activations": acts, "judge": selection})


def kept_rows(
    acts: Float[Tensor, "n layer d_model"], index: list[int], keep: list[int]
) -> Float[Tensor, "k layer d_model"]:
    """The rows of kept examples (an empty response has no activation row and is never kept)."""
    where = {ix: row for row, ix in enumerate(index)}
    return acts[[where[i] for i in keep]]
