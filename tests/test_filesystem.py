"""What the filesystem refuses ends in one line naming the path and the fix, exit status 2, with no
temporary or partial file left behind; and files are written with the process's umask.

A full or read-only disk is simulated at the system-call seams (the writes and creations under the
experiments directory raise the errno the kernel would), since the tests may run as root, which no
permission bit stops, and cannot mount a small filesystem."""

from __future__ import annotations

import errno
import os
import pathlib
import shutil
import stat
from pathlib import Path

import datasets
import pytest
import torch
from conftest import assert_nothing_partial

from tlextract.cli.main import main
from tlextract.config import load_experiment
from tlextract.ops.trait_vectors import TraitVectors
from tlextract.settings import settings_for

ARGV = ["run", "--experiment", "tiny", "--traits", "alpha", "--batch-size", "2"]
FULL = "no space left on the device; free some space and run again (finished batches are kept)."


def _cli(experiments: Path, capsys) -> tuple[int, str]:
    code = main([*ARGV, "--experiments-dir", str(experiments)])
    return code, capsys.readouterr().err


def _out_dir(experiments: Path) -> Path:
    return settings_for(load_experiment("tiny", experiments), "alpha").out_dir


def _assert_one_error(err: str, *needles: str) -> str:
    """The one error line (progress bars share stderr), holding every needle."""
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert all(n in errors[0] for n in needles), errors[0]
    return errors[0]


def _full_after(monkeypatch, root: Path, writes: int) -> None:
    """The disk under ``root`` fills after ``writes`` more files: the next one is written half
    way, then ENOSPC, as a real full disk does."""
    count = {"n": 0}
    real_bytes, real_text = pathlib.Path.write_bytes, pathlib.Path.write_text

    def full(real):
        def write(self, data, *args, **kwargs):
            if root not in self.parents:
                return real(self, data, *args, **kwargs)
            if count["n"] == writes:
                real(self, data[: len(data) // 2], *args, **kwargs)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
            count["n"] += 1
            return real(self, data, *args, **kwargs)

        return write

    monkeypatch.setattr(pathlib.Path, "write_bytes", full(real_bytes))
    monkeypatch.setattr(pathlib.Path, "write_text", full(real_text))


@pytest.mark.parametrize(
    "writes", [0, 3, 6, 10], ids=["first-shard", "later-shard", "stage-meta", "activations-shard"]
)
def test_a_full_disk_gives_one_line_leaves_nothing_partial_and_the_run_resumes(
    experiments: Path, tmp_path: Path, monkeypatch, capsys, writes: int
) -> None:
    root = experiments / "tiny"
    shutil.copytree(root, tmp_path / "reference" / "tiny")
    assert main([*ARGV, "--experiments-dir", str(tmp_path / "reference")]) == 0
    expected = TraitVectors.load(_out_dir(tmp_path / "reference") / "vectors" / "mean_diff.pt")
    capsys.readouterr()

    _full_after(monkeypatch, root, writes)
    code, err = _cli(experiments, capsys)
    assert code == 2
    _assert_one_error(err, f"{_out_dir(experiments)}/", FULL)
    assert_nothing_partial(root)
    assert not (_out_dir(experiments) / ".lock").exists()

    monkeypatch.undo()  # space freed: the run goes on from the batches it kept
    assert _cli(experiments, capsys)[0] == 0
    resumed = TraitVectors.load(_out_dir(experiments) / "vectors" / "mean_diff.pt")
    assert torch.equal(resumed.vectors, expected.vectors)


def test_a_full_disk_while_the_datasets_library_writes_gives_the_same_line(
    experiments: Path, monkeypatch, capsys
) -> None:
    """pyarrow reports ENOSPC in its message only, not as an errno."""
    real = datasets.Dataset.save_to_disk

    def full(self, path, *args, **kwargs):
        real(self, path, *args, **kwargs)  # then torn, as a full disk leaves it
        (Path(path) / "data-00000-of-00001.arrow").write_bytes(b"ARROW1")
        raise OSError(f"Error writing bytes to file. Detail: [errno 28] {os.strerror(28)}")

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", full)
    code, err = _cli(experiments, capsys)
    assert code == 2
    _assert_one_error(err, f"{_out_dir(experiments) / 'responses' / 'dataset'}: ", FULL)
    assert_nothing_partial(experiments)
    assert not (_out_dir(experiments) / "responses" / "dataset").exists()


def _refuse_under(monkeypatch, root: Path, code: int) -> None:
    """Creating anything under ``root`` fails with ``code``, as on a read-only file system."""
    real_open, real_mkdir = os.open, os.mkdir

    def refused(path) -> bool:
        return Path(path).is_relative_to(root)

    def open_(path, flags, *args, **kwargs):
        if flags & os.O_CREAT and refused(path):
            raise OSError(code, os.strerror(code), str(path))
        return real_open(path, flags, *args, **kwargs)

    def mkdir(path, *args, **kwargs):
        if refused(path):
            raise OSError(code, os.strerror(code), str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "mkdir", mkdir)


def _listing(root: Path) -> dict[str, float]:
    return {str(p.relative_to(root)): p.stat().st_mtime for p in root.rglob("*")}


@pytest.mark.parametrize(
    ("code", "needles"),
    [
        (errno.EROFS, ("read-only file system", "point the run at a writable directory")),
        (errno.EACCES, ("permission denied", "make it writable for this user")),
    ],
    ids=["read-only", "permission"],
)
@pytest.mark.parametrize("earlier_run", [False, True], ids=["fresh", "after-a-run"])
def test_an_unwritable_directory_gives_one_line_and_writes_nothing(
    experiments: Path, monkeypatch, capsys, code: int, needles: tuple[str, ...], earlier_run: bool
) -> None:
    if earlier_run:  # its directory exists: the first refusal is a file, not a directory
        assert _cli(experiments, capsys)[0] == 0
        (_out_dir(experiments) / "vectors" / "meta.json").unlink()
    before = _listing(experiments)
    _refuse_under(monkeypatch, experiments, code)
    status, err = _cli(experiments, capsys)
    monkeypatch.undo()
    assert status == 2
    _assert_one_error(err, str(_out_dir(experiments)), *needles)
    assert _listing(experiments) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through any permission bits")
def test_a_directory_without_write_permission_gives_one_line(experiments: Path, capsys) -> None:
    trait_dir = experiments / "tiny" / "alpha"
    trait_dir.chmod(0o555)
    try:
        status, err = _cli(experiments, capsys)
    finally:
        trait_dir.chmod(0o755)
    assert status == 2
    _assert_one_error(err, str(_out_dir(experiments)), "permission denied")


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_new_files_and_directories_follow_the_umask(experiments: Path, capsys, umask: int) -> None:
    before = set(experiments.rglob("*"))
    previous = os.umask(umask)
    try:
        base = ["--experiment", "tiny", "--experiments-dir", str(experiments), "--traits", "alpha"]
        assert main(["run", *base, "--n-examples", "8"]) == 0
        assert main(["report", *base, "--n-examples", "8", "--methods", "mean_diff,probe"]) == 0
    finally:
        os.umask(previous)
    written = set(experiments.rglob("*")) - before
    assert {".png", ".md", ".json", ".pt", ".safetensors", ".arrow"} <= {p.suffix for p in written}
    for p in written:
        expected = (0o777 if p.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(p.stat().st_mode) == expected, f"{p}: {oct(p.stat().st_mode)}"
