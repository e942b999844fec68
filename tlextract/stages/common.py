"""What every stage's computation shares: loading the model once, batch sizes, and the one loop
that runs work in batches, saves each batch as a shard, resumes from saved shards, and halves
the batch on out-of-memory. How a stage as a whole runs is :mod:`tlextract.stages.stage`'s."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from tlextract.errors import during
from tlextract.model.decoding import Model
from tlextract.model.load import load_model
from tlextract.model.memory import GiB, HalvingBatches
from tlextract.settings import RunSettings
from tlextract.stages.autobatch import auto_batch_size
from tlextract.store import (
    load_tensors,
    save_tensors,
)

log = logging.getLogger(__name__)


def model_loader(run: RunSettings) -> Callable[[], Model]:
    """Load the model on first use only, so a run with nothing left to do starts instantly."""
    return cache(
        lambda: load_model(run.model, device=run.device, dtype=run.dtype, backend=run.model_backend)
    )


def batch_size(
    run: RunSettings, model: Model, length: int, n_items: int, layers: Sequence[int]
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


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def move_aside(path: Path, stage: Path) -> Path:
    """Move a damaged file of ``stage`` into ``<stage>/damaged/`` (kept for inspection, out of
    the way of the run, and outside the shard directory the stage deletes when it finishes)."""
    aside = stage / "damaged" / f"{path.name}.{time.strftime('%Y%m%dT%H%M%S')}"
    aside.parent.mkdir(parents=True, exist_ok=True)
    os.replace(path, aside)
    return aside


def _read_shard(path: Path, idx: list[int], valid: Callable[[list[int], Any], bool]) -> Any:
    """The saved shard of batch ``idx``, or None when it is damaged (moved aside, said)."""
    try:
        shard = load_tensors(path)
        if valid(idx, shard):
            return shard
        problem = "its contents do not match its batch"
    except Exception as e:  # torn, empty or not a torch file at all
        problem = first_line(e)
    log.warning("damaged shard %s (%s): moved aside to %s; recomputing its batch", path, problem,
                move_aside(path, path.parent.parent))  # fmt: skip
    return None


def run_sharded(
    shards: Callable[[int], Path] | None,
    lengths: Sequence[int],
    size: int,
    compute: Callable[[list[int]], list],
    to_shard: Callable[[list[int], list], Any],
    device: Any,
    desc: str,
    valid: Callable[[list[int], Any], bool] = lambda idx, shard: True,
) -> tuple[list[Any], HalvingBatches]:
    """Items grouped into batches of ``size`` (see :func:`batches`); ``compute`` maps a chunk of
    item indices to one result each (a chunk that runs out of memory is retried at half size,
    which then sticks), ``to_shard`` turns a batch's indices and results into what is saved.
    ``shards(size)`` is the folder of the stage's shards (``stage.shard_folder``): those saved
    before an interruption are reused when they load and ``valid(indices, shard)`` holds (a
    damaged one is moved aside and its batch recomputed). Returns the contents of every shard,
    in batch order, and the halving state. ``shards`` None: the same batches, kept in memory,
    nothing written (``tx.extract``)."""
    halving = HalvingBatches(size, device)
    contents: list[Any] = []
    todo = batches(lengths, size)
    if shards is None:
        for idx in tqdm(todo, desc=desc, unit="batch", leave=False):
            contents.append(to_shard(idx, halving.run(idx, compute)))
        return contents, halving
    where = shards(size)
    with during(lambda: f"{desc} ({len(contents)} of {len(todo)} batches finished and kept)"):
        for b, idx in enumerate(tqdm(todo, desc=desc, unit="batch")):
            path = where / f"batch_{b:05d}.pt"
            shard = _read_shard(path, idx, valid) if path.exists() else None
            if shard is None:
                save_tensors(path, to_shard(idx, halving.run(idx, compute)))
                shard = load_tensors(path)  # what a resumed run would read: CPU tensors
            contents.append(shard)
    return contents, halving
