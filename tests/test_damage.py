"""Damaged work is redone, not fatal: a torn, empty, foreign or misshapen shard of an interrupted
stage, and a damaged file of a finished stage, are each moved aside, said in one line, and
recomputed, so the run ends with the vectors of an undisturbed one."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from test_pipeline import Interrupt, _interrupt_after, _run, _spy_batches

from tlextract.store import load_tensors, save_tensors


def _truncated(path: Path, other: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _empty(path: Path, other: Path) -> None:
    path.write_bytes(b"")


def _foreign(path: Path, other: Path) -> None:
    shutil.copyfile(other, path)  # a file of another stage, a valid torch file


def _misshapen(path: Path, other: Path) -> None:
    shard: Any = load_tensors(path)
    if isinstance(shard, dict):  # activations: one layer short
        shard["acts"] = shard["acts"][:, :-1]
    elif shard[0]["acts"] is not None:  # responses of combined mode: activations one layer short
        for record in shard:
            record["acts"] = record["acts"][:-1]
    else:  # responses: one record short
        shard = shard[:1]
    save_tensors(path, shard)


DAMAGE: dict[str, Callable[[Path, Path], None]] = {
    "truncated": _truncated,
    "empty": _empty,
    "foreign": _foreign,
    "misshapen": _misshapen,
}
# The interrupted stage, the run mode, and another stage's file to plant.
STAGES = {
    "responses": ("responses", "two-stage", "activations/pos.pt"),
    "responses-combined": ("responses", "combined", "vectors/mean_diff.pt"),
    "activations": ("activations", "two-stage", "vectors/mean_diff.pt"),
}
OUT = ("tiny", "alpha", "extraction")


@pytest.fixture
def reference(experiments: Path, tmp_path: Path) -> Callable[[str], tuple[torch.Tensor, Path]]:
    """An undisturbed run of a mode in a copy of the experiments: its vectors and directory."""

    def run(mode: str) -> tuple[torch.Tensor, Path]:
        root = tmp_path / f"reference-{mode}"
        shutil.copytree(experiments, root)
        return _run(root, batch_size=2, mode=mode).vectors, root.joinpath(*OUT)

    return run


@pytest.mark.parametrize("damage", DAMAGE)
@pytest.mark.parametrize("stage", STAGES)
def test_a_damaged_shard_is_moved_aside_and_its_batch_recomputed(
    experiments: Path, reference, monkeypatch, caplog, stage: str, damage: str
) -> None:
    name, mode, foreign = STAGES[stage]
    expected, reference_out = reference(mode)
    _interrupt_after(monkeypatch, name, calls=2)
    with pytest.raises(Interrupt):
        _run(experiments, batch_size=2, mode=mode)
    monkeypatch.undo()
    stage_dir = experiments.joinpath(*OUT, name)
    shard = next(stage_dir.glob("shards-*/batch_00000.pt"))
    DAMAGE[damage](shard, reference_out / foreign)

    calls: list[int] = []
    _spy_batches(monkeypatch, name, lambda chunk: calls.append(1))
    with caplog.at_level(logging.WARNING):
        resumed = _run(experiments, batch_size=2, mode=mode)

    assert torch.equal(resumed.vectors, expected)
    assert len(calls) == 6 - 2 + 1  # the four never done, and the damaged one again
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and f"damaged shard {shard}" in warnings[0], warnings
    aside = list((stage_dir / "damaged").iterdir())
    assert [p.name.split(".")[0] for p in aside] == ["batch_00000"]
    assert str(aside[0]) in warnings[0]


def _misshapen_acts(path: Path, other: Path) -> None:
    data = load_tensors(path)
    data["acts"] = data["acts"][1:]  # one row fewer than meta.json counts
    save_tensors(path, data)


# A finished stage's file, and how it is damaged.
FINISHED = {
    "responses": ("responses/dataset/data-00000-of-00001.arrow", _truncated),
    "responses meta": ("responses/meta.json", _truncated),
    "judgments": ("judge/judgments.json", _empty),
    "activations": ("activations/pos.pt", _truncated),
    "activations shape": ("activations/neg.pt", _misshapen_acts),
    "vectors": ("vectors/mean_diff.pt", _empty),
}


@pytest.mark.parametrize("target", FINISHED)
def test_a_damaged_finished_stage_is_recomputed(
    experiments: Path, tiny_model, caplog, target: str
) -> None:
    expected = _run(experiments, get_model=lambda: tiny_model).vectors
    out = experiments.joinpath(*OUT)
    relative, damage = FINISHED[target]
    damage(out / relative, out / relative)
    with caplog.at_level(logging.WARNING):
        again = _run(experiments, get_model=lambda: tiny_model)
    assert torch.equal(again.vectors, expected)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    stage = out / relative.split("/")[0]
    assert len(warnings) == 1 and f"damaged output in {stage}" in warnings[0], warnings
    assert [p.name.split(".")[0] for p in (stage / "damaged").iterdir()] == ["meta"]
