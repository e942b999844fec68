"""Ctrl-C and SIGTERM are a normal way to stop: real signals sent to a real ``python -m
tlextract`` on the tiny model, at several stages and commands. Each ends with one line saying
what was running and that a rerun resumes, exit status 130 (SIGINT) or 143 (SIGTERM), no
traceback and nothing torn; the rerun ends with the vectors of an uninterrupted run."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import assert_nothing_partial, write_experiment

import tlextract
from tlextract.cli.main import main
from tlextract.ops.trait_vectors import TraitVectors

REPO = Path(tlextract.__file__).resolve().parents[1]
OUT = Path("tiny/alpha/extraction")
RUN = ["run", "--experiment", "tiny", "--traits", "alpha", "--batch-size", "2"]
STEER = ["steer", "--experiment", "tiny", "--traits", "alpha", "--n-questions", "2"]
REPORT = ["report", "--experiment", "tiny", "--traits", "alpha"]


def _experiment(root: Path) -> Path:
    # 12 examples a side in batches of 2, 16 tokens each: stages long enough to stop inside.
    write_experiment(root, n_examples=12, generation={"max_new_tokens": 16, "temperature": 1.0})
    return root


def _start(root: Path, argv: list[str]) -> tuple[subprocess.Popen, Path, Path]:
    out, err = root / "stdout.txt", root / "stderr.txt"
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(  # the files, not pipes: a full pipe would stall the child
        [sys.executable, "-m", "tlextract", *argv, "--experiments-dir", str(root)],
        stdout=out.open("w"), stderr=err.open("w"), env=env, cwd=root,
    )  # fmt: skip
    return proc, out, err


def _wait_for(proc: subprocess.Popen, ready: Callable[[], bool], timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, "the command ended before the moment to interrupt it"
        assert time.monotonic() < end, "the moment to interrupt never came"
        time.sleep(0.02)


def _shard(root: Path, stage: str, n: int) -> Callable[[], bool]:
    return lambda: any((root / OUT / stage).glob(f"shards-*/batch_{n:05d}.pt"))


def _printed(path: Path, text: str) -> Callable[[], bool]:
    return lambda: text in path.read_text()


def _interrupt(proc: subprocess.Popen, err: Path, signals: list[signal.Signals]) -> str:
    """Send ``signals`` (50 ms apart); the one line the command ended with."""
    for s in signals:
        proc.send_signal(s)
        time.sleep(0.05)
    code = proc.wait(timeout=120)
    text = err.read_text()
    assert "Traceback" not in text, text
    assert code == 128 + signals[0], text
    lines = [line for line in text.replace("\r", "\n").splitlines() if "interrupted" in line]
    assert len(lines) == 1 and lines[0].startswith("interrupted by "), text
    assert "run the same command again to resume" in lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> torch.Tensor:
    root = _experiment(tmp_path_factory.mktemp("reference"))
    assert main([*RUN, "--experiments-dir", str(root)]) == 0
    return TraitVectors.load(root / OUT / "vectors" / "mean_diff.pt").vectors


@pytest.mark.parametrize(
    ("stage", "batch", "signals", "named"),
    [
        ("responses", 2, [signal.SIGINT], "Ctrl-C (SIGINT) during [alpha] generate ("),
        ("activations", 1, [signal.SIGTERM], "SIGTERM during [alpha] activations ("),
        ("responses", 1, [signal.SIGINT, signal.SIGINT], "during [alpha] generate"),
    ],
    ids=["generate-sigint", "activations-sigterm", "generate-ctrl-c-twice"],
)
def test_a_signal_during_a_stage_ends_in_one_line_and_the_rerun_resumes_to_equal_vectors(
    tmp_path: Path, reference: torch.Tensor, stage: str, batch: int,
    signals: list[signal.Signals], named: str,
) -> None:  # fmt: skip
    root = _experiment(tmp_path)
    proc, _, err = _start(root, RUN)
    _wait_for(proc, _shard(root, stage, batch))
    line = _interrupt(proc, err, signals)
    assert named in line and "batches finished and kept" in line, line
    assert_nothing_partial(root / "tiny")
    assert not (root / OUT / ".lock").exists()
    kept = list((root / OUT / stage).glob("shards-*/batch_*.pt"))
    assert len(kept) >= batch + 1  # the finished batches stay for the rerun

    assert main([*RUN, "--experiments-dir", str(root)]) == 0
    resumed = TraitVectors.load(root / OUT / "vectors" / "mean_diff.pt").vectors
    assert torch.equal(resumed, reference)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, reference: torch.Tensor) -> Path:
    """A finished run, copied by each test of the commands that read one."""
    root = _experiment(tmp_path_factory.mktemp("finished"))
    assert main([*RUN, "--experiments-dir", str(root)]) == 0
    return root


@pytest.mark.parametrize(
    ("argv", "marker", "sig", "named"),
    [
        (REPORT, "[alpha] evaluation:", signal.SIGTERM, "during report"),
        (STEER, "alpha -1: mean projection", signal.SIGINT, "during steer"),
    ],
    ids=["report-sigterm", "steer-sigint"],
)
def test_a_signal_during_report_or_steer_ends_in_one_line_and_a_rerun_finishes(
    tmp_path: Path, finished: Path, argv: list[str], marker: str, sig: signal.Signals,
    named: str,
) -> None:  # fmt: skip
    root = tmp_path / "copy"
    shutil.copytree(finished, root)
    proc, out, err = _start(root, argv)
    _wait_for(proc, _printed(out, marker))
    assert named in _interrupt(proc, err, [sig])
    assert_nothing_partial(root / "tiny")
    assert main([*argv, "--experiments-dir", str(root)]) == 0
