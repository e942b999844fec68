"""Stage 3, activations: each response's hook outputs averaged over its response tokens
(never the prompt or padding), float32, per polarity. Two-stage mode runs a teacher-forced pass
over prompt + response; combined mode takes what the responses stage recorded while generating.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from datasets import Dataset
from jaxtyping import Float
from torch import Tensor

from tlextract.errors import TLExtractError
from tlextract.model.tokens import device_of
from tlextract.ops.pool import hook_name
from tlextract.settings import RunSettings
from tlextract.stages.common import batch_size
from tlextract.stages.compute import Capture, pool_records
from tlextract.stages.responses import RESPONSES, load_pooled, responses_key
from tlextract.stages.stage import GetModel, Job, Stage, need, run_stage
from tlextract.store import META, fingerprint, load_tensors, read_json, save_tensors
from tlextract.traits import POLARITIES

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Activations:
    """Pooled activations per polarity; ``index[p][i]`` is the example index of row i."""

    pos: Float[Tensor, "n_pos layer d_model"]
    neg: Float[Tensor, "n_neg layer d_model"]
    pos_index: list[int]
    neg_index: list[int]
    layers: tuple[int, ...]
    hook: str
    key: str


def activations_key(run: RunSettings, responses_fp: str) -> str:
    return fingerprint(
        {
            "responses": responses_fp,
            "layers": run.layers,
            "hook": run.experiment.hook,
            "pooling": "response_mean",
            "dtype": run.dtype,
            "mode": run.mode,
        }
    )


def current_activations_key(run: RunSettings) -> str:
    """The key activations of these settings have (whether or not they exist yet)."""
    return activations_key(run, responses_key(run))


def read_activations(run: RunSettings, key: str) -> Activations:
    """The stage's activations, checked against its meta.json (rows, layers, index)."""
    stage = run.stage_dir("activations")
    meta = read_json(stage / META)
    data = {p: load_tensors(stage / f"{p}.pt") for p in POLARITIES}
    for p in POLARITIES:
        acts, index = data[p]["acts"], data[p]["index"]
        if acts.shape[:2] != (meta["counts"][p], len(meta["layers"])) or len(index) != len(acts):
            expected = f"{meta['counts'][p]} rows x {len(meta['layers'])} layers"
            raise ValueError(f"{p}.pt holds {tuple(acts.shape)}, meta.json says {expected}")
    return Activations(
        pos=data["pos"]["acts"],
        neg=data["neg"]["acts"],
        pos_index=data["pos"]["index"],
        neg_index=data["neg"]["index"],
        layers=tuple(meta["layers"]),
        hook=meta["hook"],
        key=key,
    )


# The layers pooled at, and each response's pooled activations by (polarity, index).
Pooled = tuple[tuple[int, ...], dict[tuple[str, int], Float[Tensor, "layer d_model"]]]


def compute_activations(job: Job) -> Pooled:
    run = job.run
    if run.mode == "combined":  # recorded while generating: the responses stage has them
        pooled, layers = load_pooled(run)
        return layers, pooled
    model = job.get_model()
    capture = Capture.of(run.mode, run.experiment.hook, run.layers, model.cfg.n_layers)
    rows = [r for r in job.inputs["responses"] if r["n_response_tokens"] > 0]
    longest = max(len(r["prompt_ids"]) + r["n_response_tokens"] for r in rows)
    size = batch_size(run, model, longest, len(rows), capture.layers)
    pooled = pool_records(model, rows, capture, size, job.sharded,
                          device_of(model), f"[{run.trait.name}] activations")  # fmt: skip
    return capture.layers, pooled


def save_activations(job: Job, out: Pooled) -> dict[str, Any]:
    """Pooled activations per polarity (rows ordered by example index); what meta.json adds."""
    run, stage, (layers, pooled) = job.run, job.dir, out
    counts = {}
    for pol in POLARITIES:
        index = sorted(i for p, i in pooled if p == pol)
        if not index:
            raise TLExtractError(
                f"{run.trait.name}: no {pol} response has any token, so there is nothing to "
                "average. Raise generation.max_new_tokens or check the prompts."
            )
        acts = torch.stack([pooled[(pol, i)] for i in index])
        save_tensors(stage / f"{pol}.pt", {"acts": acts, "index": index})
        counts[pol] = len(index)
    n_empty = 2 * run.n_examples - len(pooled)
    if n_empty:
        log.warning("%d empty responses have no tokens to pool over and are left out", n_empty)
    log.info("[%s] activations (%s): %s x %d layers -> %s", run.trait.name, run.mode, counts,
             len(layers), stage)  # fmt: skip
    return dict(
        mode=run.mode, layers=list(layers), hook=run.experiment.hook,
        hook_names=[hook_name(run.experiment.hook, layer) for layer in layers],
        pooling="mean over response tokens (the residual at each response token position)",
        counts=counts, n_empty_responses_left_out=n_empty, d_model=acts.shape[-1],
    )  # fmt: skip


ACTIVATIONS: Stage[Activations] = Stage(
    "activations", (RESPONSES,), "pos.pt, neg.pt", key=current_activations_key,
    compute=compute_activations, save=save_activations, load=read_activations,
)  # fmt: skip


def extract_activations(
    run: RunSettings, get_model: GetModel, responses: Dataset | None = None
) -> Activations:
    """Run the activations stage alone; ``responses``: the responses stage's output when the
    caller has it."""
    got = {} if responses is None else {"responses": responses}
    return run_stage(ACTIVATIONS, run, get_model, got)


def load_activations(run: RunSettings) -> Activations:
    return need(ACTIVATIONS, run)
