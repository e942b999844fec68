"""What every stage shares: loading the model once, stage metadata, batch sizes, and the one
loop that runs work in batches, saves each batch as a shard, resumes from saved shards, and
halves the batch on out-of-memory."""

from __future__ import annotations

import importlib.metadata
import logging
import os
import time
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from tlextract.errors import during
from tlextract.model.load import load_model
from tlextract.model.memory import GiB, HalvingBatches
from tlextract.settings import RunSettings, pick_device
from tlextract.stages.autobatch import auto_batch_size
from tlextract.store import (
    META,
    clear_other_shards,
    fingerprint,
    load_tensors,
    read_json,
    save_tensors,
    shard_dir,
)

log = logging.getLogger(__name__)
T = TypeVar("T")


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
        "dtype": run.dtype,  # resolved: "auto" became bfloat16 on CUDA, float32 elsewhere
        "device": pick_device(run.device),
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


def reuse(stage: Path, key: str, load: Callable[[], T], what: str) -> T | None:
    """A finished stage's output read back, or None when the stage must run: not finished with
    these settings, or finished but damaged (a torn meta.json, or any failure to read back and
    check what it wrote: its meta.json is moved aside, said in one line, and the stage
    recomputes)."""
    meta = stage / META
    if not meta.exists():
        return None
    try:
        if read_json(meta).get("fingerprint") != key:
            return None
        return load()
    except Exception as e:  # a torn, truncated or foreign file: redo the stage, never fail
        log.warning("%s: damaged output in %s (%s); recomputing (old meta.json: %s)", what,
                    stage, first_line(e), move_aside(meta, stage))  # fmt: skip
        return None


def _read_shard(
    stage: Path, path: Path, idx: list[int], valid: Callable[[list[int], Any], bool]
) -> Any:
    """The saved shard of batch ``idx``, or None when it is damaged (moved aside, said)."""
    try:
        shard = load_tensors(path)
        if valid(idx, shard):
            return shard
        problem = "its contents do not match its batch"
    except Exception as e:  # torn, empty or not a torch file at all
        problem = first_line(e)
    log.warning("damaged shard %s (%s): moved aside to %s; recomputing its batch", path, problem,
                move_aside(path, stage))  # fmt: skip
    return None


def run_sharded(
    stage: Path | None,
    key: str,
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
    Shards of these settings saved before an interruption are reused when they load and
    ``valid(indices, shard)`` holds (a damaged one is moved aside and its batch recomputed),
    shards of other settings removed. Returns the contents of every shard, in batch order, and
    the halving state. ``stage`` None: the same batches, kept in memory, nothing written
    (``tx.extract``)."""
    halving = HalvingBatches(size, device)
    contents: list[Any] = []
    todo = batches(lengths, size)
    if stage is None:
        for idx in tqdm(todo, desc=desc, unit="batch", leave=False):
            contents.append(to_shard(idx, halving.run(idx, compute)))
        return contents, halving
    shards = shard_dir(stage, fingerprint([key, size]))
    clear_other_shards(stage, keep=shards.name.removeprefix("shards-"))
    with during(lambda: f"{desc} ({len(contents)} of {len(todo)} batches finished and kept)"):
        for b, idx in enumerate(tqdm(todo, desc=desc, unit="batch")):
            path = shards / f"batch_{b:05d}.pt"
            shard = _read_shard(stage, path, idx, valid) if path.exists() else None
            if shard is None:
                save_tensors(path, to_shard(idx, halving.run(idx, compute)))
                shard = load_tensors(path)  # what a resumed run would read: CPU tensors
            contents.append(shard)
    return contents, halving
