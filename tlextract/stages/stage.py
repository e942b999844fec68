"""What a stage is, and the one way any stage runs.

A :class:`Stage` names its functions: ``key`` (a fingerprint of everything its output depends
on), ``compute``, ``save`` (writes its files, returns what its record adds) and ``load`` (reads
them back and checks them). :func:`run_stage` is the only code that reuses a finished output,
logs "up to date, skipped", writes the record (``meta.json``) and clears shards;
:func:`fresh` is the only answer to "is this output up to date?" and :func:`need` the only
"run X first". The pipeline's stages are declared in their modules and listed in
:data:`tlextract.stages.run.PIPELINE`; the cross-validation report is one too
(:mod:`tlextract.evaluation.crossval`), run by the same code.
"""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Generic, TypeVar

from tlextract.errors import TLExtractError
from tlextract.model.decoding import Model
from tlextract.model.source import backend_of
from tlextract.settings import RunSettings, pick_device
from tlextract.stages.common import first_line, move_aside, run_sharded
from tlextract.stages.compute import Shards
from tlextract.store import META, clear_other_shards, fingerprint, read_json, shard_dir, write_json

log = logging.getLogger(__name__)
T = TypeVar("T")
GetModel = Callable[[], Model]


def versions() -> dict[str, str]:
    pkgs = ("tlextract", "torch", "transformer-lens", "transformers")
    return {p: importlib.metadata.version(p) for p in pkgs}


def stage_meta(stage: str, key: str, run: RunSettings, **extra: Any) -> dict[str, Any]:
    """A pipeline stage's ``meta.json``: its key, the run's settings and what ``save`` adds."""
    return {
        "stage": stage,
        "fingerprint": key,
        "experiment": run.experiment.name,
        "trait": run.trait.name,
        "variant": run.variant,
        "model": run.model,
        "backend": backend_of(run.model, run.model_backend),
        "dtype": run.dtype,  # resolved: "auto" became bfloat16 on CUDA, float32 elsewhere
        "device": pick_device(run.device),
        "versions": versions(),
        **extra,
    }


def key_only(stage: str, key: str, run: RunSettings, **extra: Any) -> dict[str, Any]:
    """A record that is the output itself: its key and what ``save`` gave (crossval.json)."""
    return {"fingerprint": key, **extra}


def in_stage_dir(run: RunSettings, stage: str) -> Path:
    return run.stage_dir(stage)


def shard_folder(folder: Path, key: str, size: int) -> Path:
    """Where batches of ``size`` are saved while a stage runs, named by key and size so a
    changed setting never resumes from another's; shards of other settings go."""
    where = shard_dir(folder, fingerprint([key, size]))
    clear_other_shards(folder, keep=where.name.removeprefix("shards-"))
    return where


@dataclass(frozen=True)
class Job:
    """One computation of a stage: the run, its model (loaded on first use), the folder it
    writes, its key, the outputs of the stages it reads, and how it runs work in batches
    (:func:`tlextract.stages.common.run_sharded` saving into this folder's shards)."""

    run: RunSettings
    get_model: GetModel
    dir: Path
    key: str
    inputs: Mapping[str, Any]
    sharded: Shards


@dataclass(frozen=True)
class Stage(Generic[T]):
    """A stage: its name, the stages whose outputs it reads, what it writes, and its functions.
    ``load(run, key)`` raises on a damaged output; it returns None when the output is intact
    but does not hold what is asked (then the stage recomputes)."""

    name: str
    reads: tuple[Stage[Any], ...]
    writes: str
    key: Callable[[RunSettings], str]
    compute: Callable[[Job], Any]
    save: Callable[[Job, Any], dict[str, Any]]
    load: Callable[[RunSettings, str], T | None]
    folder: Callable[[RunSettings, str], Path] = in_stage_dir
    record: str = META  # the file whose "fingerprint" says what the output was made from
    describe: Callable[..., dict[str, Any]] = stage_meta  # the record's contents


def _recorded(stage: Stage[Any], run: RunSettings) -> Path:
    return stage.folder(run, stage.name) / stage.record


def _made_with(record: Path, key: str) -> bool:
    """The one rule of "up to date": the record names the key of the current settings (raises
    on a torn or foreign record)."""
    return bool(record.exists() and read_json(record).get("fingerprint") == key)


def fresh(stage: Stage[T], run: RunSettings, key: str) -> T | None:
    """The stage's output read back when it was made with ``key``, else None: not made, made
    with other settings, or damaged (a torn record or any failure to read back and check the
    output: the record is moved aside, said in one line, and the stage recomputes)."""
    record = _recorded(stage, run)
    try:
        return stage.load(run, key) if _made_with(record, key) else None
    except Exception as e:  # a torn, truncated or foreign file: redo the stage, never fail
        log.warning("[%s] %s: damaged output in %s (%s); recomputing (old %s: %s)",
                    run.trait.name, stage.name, record.parent, first_line(e), stage.record,
                    move_aside(record, record.parent))  # fmt: skip
        return None


def up_to_date(stage: Stage[Any], run: RunSettings) -> bool:
    """Whether ``stage`` and the stages it reads were made with these settings (without
    reading their outputs back: a damaged one shows when a run reads it)."""
    try:
        return _made_with(_recorded(stage, run), stage.key(run)) and all(
            up_to_date(r, run) for r in stage.reads
        )
    except (TLExtractError, OSError, ValueError, AttributeError):
        return False  # an earlier stage its key needs has not run, or a torn record


def need(stage: Stage[T], run: RunSettings) -> T:
    """The stage's up-to-date output, or one line saying to run it first."""
    out = fresh(stage, run, stage.key(run))
    if out is None:
        raise TLExtractError(
            f"{stage.folder(run, stage.name)}: no {stage.name} output for these settings yet. "
            f"Run the '{stage.name}' stage first."
        )
    return out


def run_stage(
    stage: Stage[T], run: RunSettings, get_model: GetModel, got: Mapping[str, Any] | None = None
) -> T:
    """The stage's output: read back when up to date, else computed, saved and recorded.
    ``got``: outputs of the stages it reads that the caller has (the others are read back)."""
    key, folder = stage.key(run), stage.folder(run, stage.name)
    done = fresh(stage, run, key)
    if done is not None:
        log.info("[%s] %s: up to date, skipped (%s)", run.trait.name, stage.name, folder)
        return done
    got = got or {}
    inputs = {r.name: got[r.name] if r.name in got else need(r, run) for r in stage.reads}
    job = Job(run, get_model, folder, key, inputs,
              partial(run_sharded, partial(shard_folder, folder, key)))  # fmt: skip
    extra = stage.save(job, stage.compute(job))
    write_json(folder / stage.record, stage.describe(stage.name, key, run, **extra))
    clear_other_shards(folder)
    out = stage.load(run, key)  # what a later run reads back, checked
    assert out is not None, f"{stage.name}: load refuses what save just wrote"
    return out
