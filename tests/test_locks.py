"""One writer per trait run: the lock between processes (held, refused, waited for, freed when its
holder is killed) and two CLI runs of one trait at once, which end as one run would."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from conftest import write_experiment

import tlextract
from tlextract.cli.main import main
from tlextract.config import load_experiment
from tlextract.errors import TLExtractError
from tlextract.locks import LOCK_FILE, run_lock
from tlextract.ops.trait_vectors import TraitVectors
from tlextract.settings import STAGES, settings_for
from tlextract.stages.run import run_trait

PACKAGE = Path(tlextract.__file__).parent
REPO = PACKAGE.parent
WAITING = "waiting (use --no-wait to stop instead)"
# A process that takes the lock of argv[2] (waiting or not: argv[4]), marks argv[3]/acquired, and
# holds the lock until argv[3]/release exists. The package's __init__ imports the whole pipeline
# (seconds); an empty package module in its place lets this import tlextract.locks alone.
HOLDER = """
import logging, sys, time, types
from pathlib import Path
package = types.ModuleType("tlextract")
package.__path__ = [sys.argv[1]]
sys.modules["tlextract"] = package
from tlextract.locks import run_lock

logging.basicConfig(level=logging.INFO, format="%(message)s")
lock_dir, marks, wait = Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4] == "wait"
with run_lock(lock_dir, wait=wait, poll=0.05):
    (marks / "acquired").write_text(str(time.monotonic_ns()))
    while not (marks / "release").exists():
        time.sleep(0.02)
    (marks / "released").write_text(str(time.monotonic_ns()))
"""


def _until(done: Callable[[], bool], what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


class Holder:
    """A process running HOLDER; its stderr goes to <marks>/stderr."""

    def __init__(self, lock_dir: Path, marks: Path, wait: bool = True):
        self.marks = marks
        marks.mkdir(parents=True)
        self.stderr = open(marks / "stderr", "w")  # noqa: SIM115 - closed in stop()
        args = [str(PACKAGE), str(lock_dir), str(marks)]
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, *args, "wait" if wait else "no-wait"],
            stderr=self.stderr,
        )

    def locked(self) -> Holder:
        _until(lambda: (self.marks / "acquired").exists(), f"pid {self.proc.pid} to lock")
        return self

    def log(self) -> str:
        return (self.marks / "stderr").read_text()

    def stamp(self, name: str) -> int:
        return int((self.marks / name).read_text())

    def release(self) -> None:
        (self.marks / "release").touch()
        assert self.proc.wait(timeout=60) == 0, self.log()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.stderr.close()


@pytest.fixture
def holders() -> Iterator[Callable[..., Holder]]:
    started: list[Holder] = []

    def start(lock_dir: Path, marks: Path, wait: bool = True) -> Holder:
        started.append(Holder(lock_dir, marks, wait))
        return started[-1]

    yield start
    for h in started:
        h.stop()


def test_a_held_lock_refuses_another_process_until_its_holder_is_killed(
    tmp_path: Path, holders: Callable[..., Holder]
) -> None:
    d = tmp_path / "run"
    holder = holders(d, tmp_path / "a").locked()
    with pytest.raises(TLExtractError) as refused, run_lock(d, wait=False):
        pass
    assert f"pid {holder.proc.pid} on " in str(refused.value)
    assert str(refused.value).startswith(f"{d}: another run is writing it")
    holder.proc.send_signal(signal.SIGKILL)
    holder.proc.wait()
    with run_lock(d, wait=False):  # the OS freed it with the process
        assert f"pid {os.getpid()} on " in (d / LOCK_FILE).read_text()


def test_locks_of_different_directories_do_not_block_each_other(
    tmp_path: Path, holders: Callable[..., Holder]
) -> None:
    holders(tmp_path / "alpha", tmp_path / "a").locked()
    with run_lock(tmp_path / "beta", wait=False):
        pass
    with pytest.raises(TLExtractError), run_lock(tmp_path / "alpha", wait=False):
        pass  # while the same directory is still refused


def test_a_waiting_process_names_the_holder_and_locks_after_it_releases(
    tmp_path: Path, holders: Callable[..., Holder]
) -> None:
    d = tmp_path / "run"
    first = holders(d, tmp_path / "a").locked()
    second = holders(d, tmp_path / "b")
    (second.marks / "release").touch()  # the second lets go as soon as it has the lock
    _until(lambda: WAITING in second.log(), "the second process to wait")
    assert f"{d} is being written by pid {first.proc.pid} on " in second.log()
    assert not (second.marks / "acquired").exists()
    time.sleep(0.3)  # several polls of the second, each of which must stay silent
    first.release()
    assert second.proc.wait(timeout=60) == 0, second.log()
    assert second.stamp("acquired") > first.stamp("released")
    assert second.log().count(WAITING) == 1  # one line, not one per poll


def test_the_lock_is_released_on_error_leaving_no_trace(tmp_path: Path) -> None:
    with pytest.raises(ValueError), run_lock(tmp_path / "run"):
        raise ValueError
    assert not (tmp_path / "run").exists()  # it made the directory and nothing was written
    (tmp_path / "kept").mkdir()
    with run_lock(tmp_path / "kept", wait=False):
        (tmp_path / "kept" / "result").touch()
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["result"]


def test_a_waiter_that_had_the_removed_file_open_locks_the_file_at_the_path(
    tmp_path: Path, holders: Callable[..., Holder]
) -> None:
    d = tmp_path / "run"
    first = holders(d, tmp_path / "a").locked()
    second = holders(d, tmp_path / "b")
    _until(lambda: WAITING in second.log(), "the second process to wait")
    first.release()  # removes the file the second has open
    second.locked()
    assert (d / LOCK_FILE).is_file()
    assert f"pid {second.proc.pid} on " in (d / LOCK_FILE).read_text()
    with pytest.raises(TLExtractError), run_lock(d, wait=False):
        pass  # a third process sees the second's lock, not a fresh file of its own


def _cli_run(root: Path, out: Path, *extra: str) -> subprocess.Popen[bytes]:
    args = ["run", "--experiment", "tiny", "--experiments-dir", str(root), "--traits", "alpha"]
    with open(f"{out}.out", "w") as stdout, open(f"{out}.err", "w") as stderr:
        return subprocess.Popen(
            [sys.executable, "-m", "tlextract", *args, *extra],
            stdout=stdout,
            stderr=stderr,
            cwd=REPO,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )


def _vectors(root: Path) -> torch.Tensor:
    path = root / "tiny" / "alpha" / "extraction" / "vectors" / "mean_diff.pt"
    return TraitVectors.load(path).vectors


def test_two_cli_runs_of_one_trait_at_once_end_as_one_run(tmp_path: Path) -> None:
    shared, alone, logs = tmp_path / "shared", tmp_path / "alone", tmp_path / "logs"
    write_experiment(shared)
    shutil.copytree(shared, alone)
    logs.mkdir()
    out_dir = settings_for(load_experiment("tiny", shared), "alpha").out_dir
    # Held here until both runs wait on it, so they then race for it, whichever starts first.
    with run_lock(out_dir):
        runs = [_cli_run(shared, logs / name) for name in ("one", "two")]
        reference = _cli_run(alone, logs / "alone")
        err = [logs / "one.err", logs / "two.err"]
        _until(lambda: all(WAITING in p.read_text() for p in err), "both runs to wait")
    codes = [p.wait(timeout=300) for p in [*runs, reference]]
    outputs = {p.name: p.read_text() for p in sorted(logs.iterdir())}
    assert codes == [0, 0, 0], outputs
    assert not any("Traceback" in text for text in outputs.values()), outputs
    skipped = [n for n in ("one", "two") if "responses: up to date" in outputs[f"{n}.out"]]
    assert len(skipped) == 1, outputs  # the second found the first one's finished stages
    assert torch.equal(_vectors(shared), _vectors(alone))
    assert not (out_dir / LOCK_FILE).exists()


def test_no_wait_exits_2_with_one_line_naming_the_holder(experiments: Path, capsys) -> None:
    run = settings_for(load_experiment("tiny", experiments), "alpha")
    argv = ["run", "--experiment", "tiny", "--experiments-dir", str(experiments)]
    with run_lock(run.out_dir):
        code = main([*argv, "--traits", "alpha", "--no-wait"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2
    assert len(lines) == 1, lines
    assert f"{run.out_dir}: another run is writing it (pid {os.getpid()} on " in lines[0]
    assert not any(run.stage_dir(stage).exists() for stage in STAGES)


def test_another_trait_runs_while_one_is_locked(experiments: Path, tiny_model) -> None:
    experiment = load_experiment("tiny", experiments)
    with run_lock(settings_for(experiment, "alpha").out_dir):
        # wait=False: a lock shared across traits would fail here instead of hanging.
        vectors = run_trait(
            settings_for(experiment, "beta"), get_model=lambda: tiny_model, wait=False
        )
    assert vectors is not None and vectors.metadata["n_pos"] > 0
