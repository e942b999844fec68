"""What every stage shares: loading the model once, stage metadata, batch sizes, and the one
loop that runs work in batches, saves each batch as a shard, resumes from saved shards, and
halves the batch on out-of-memory."""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from tlextract.model.load import load_model
from tlextract.model.memory import GiB, HalvingBatches
from tlextract.model.tokens import device_of
from tlextract.settings import RunSettings
from tlextract.stages.autobatch import auto_batch_size
from tlextract.store import (
    clear_other_shards,
    fingerprint,
    load_tensors,
    save_tensors,
    shard_dir,
)

log = logging.getLogger(__name__)


def model_loader(run: RunSettings) -> Callable[[], HookedTransformer]:
    """Load the model on first use only, so a run with nothing left to do starts instantly."""
    return cache(lambda: load_model(run.model, device=run.device, dtype=run.dtype))


def versions() -> dict[str, str]:
    pkgs = ("tlextract", "torch", "transformer-lens", "transformers")
    return {p: importlib.metadata.version(p) for p in pkgs}


def stage_meta(stage: str, key: str, run: RunSettings, **extra: Any) -> dict[str, Any]:
    return {
        "stage": stage,
        "fingerprint": key,
        "experiment": run.experiment.name,
        "trait": run.trait.name,
        "variant": run.variant,
        "model": run.model,
        "dtype": run.dtype,
        "versions": versions(),
        **extra,
    }


def batch_size(
    run: RunSettings, model: HookedTransformer, length: int, n_items: int, layers: Sequence[int]
) -> int:
    """The run's batch size; for "auto", the largest that fits the memory budget for rows of
    ``length`` tokens (from peaks measured on this model)."""
    if run.batch_size != "auto":
        return run.batch_size
    budget = None if run.memory_budget_gib is None else run.memory_budget_gib * GiB
    size = auto_batch_size(model, length, n_items, layers, run.experiment.hook, budget)
    log.info("[%s] batch size auto: %d", run.trait.name, size)
    return size


def batches(lengths: Sequence[int], size: int) -> list[list[int]]:
    """Indices grouped by length (longest first) so rows in a batch pad little."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + size] for i in range(0, len(order), size)]


def run_sharded(
    stage: Path,
    key: str,
    lengths: Sequence[int],
    size: int,
    compute: Callable[[list[int]], list],
    to_shard: Callable[[list[int], list], Any],
    model: HookedTransformer,
    desc: str,
) -> tuple[list[Any], HalvingBatches]:
    """Items grouped into batches of ``size`` (see :func:`batches`); ``compute`` maps a chunk of
    item indices to one result each (a chunk that runs out of memory is retried at half size,
    which then sticks), ``to_shard`` turns a batch's indices and results into what is saved.
    Shards of these settings saved before an interruption are reused, shards of other settings
    removed. Returns the contents of every shard, in batch order, and the halving state."""
    shards = shard_dir(stage, fingerprint([key, size]))
    clear_other_shards(stage, keep=shards.name.removeprefix("shards-"))
    shards.mkdir(parents=True, exist_ok=True)
    halving = HalvingBatches(size, device_of(model))
    for b, idx in enumerate(tqdm(batches(lengths, size), desc=desc, unit="batch")):
        path = shards / f"batch_{b:05d}.pt"
        if not path.exists():  # else finished before an interruption
            save_tensors(path, to_shard(idx, halving.run(idx, compute)))
    return [load_tensors(p) for p in sorted(shards.glob("batch_*.pt"))], halving
