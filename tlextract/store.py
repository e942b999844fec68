"""On-disk layout helpers: atomic writes, settings fingerprints, per-stage metadata.

Every file is written to a temporary sibling and renamed into place, so a reader (or a resumed run)
only ever sees complete files. A stage is finished when its ``meta.json`` exists and records the
fingerprint of the settings and inputs that produced it.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import torch

from tlextract.errors import TLExtractError
from tlextract.inputs import PathArg

META = "meta.json"


def fingerprint(obj: Any) -> str:
    """A short stable hash of JSON-serialisable settings."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# What the filesystem refuses, and what to do about it: one line instead of a traceback.
_DISK_FAULTS = {
    errno.EROFS: ("read-only file system", "point the run at a writable directory "
                  "(--experiments-dir or TLEXTRACT_EXPERIMENTS)"),
    errno.ENOSPC: ("no space left on the device", "free some space and run again (finished "
                   "batches are kept)"),
    errno.EDQUOT: ("disk quota exceeded", "free some space and run again (finished batches are "
                   "kept)"),
    errno.EACCES: ("permission denied", "make it writable for this user, or point the run at "
                   "another directory (--experiments-dir)"),
    errno.EPERM: ("operation not permitted", "make it writable for this user, or point the run "
                  "at another directory (--experiments-dir)"),
    # A file where a directory must be (or the other way round): say which one is in the way.
    errno.EEXIST: ("a file is in the way of a directory", "move or remove that file"),
    errno.ENOTDIR: ("a file is in the way of a directory", "move or remove that file"),
    errno.EISDIR: ("a directory is in the way of the file", "move or remove that directory"),
    errno.ENAMETOOLONG: ("the file name is too long for the file system", "use shorter "
                         "experiment, trait or model names, or a shorter --experiments-dir"),
    errno.ELOOP: ("too many levels of symbolic links", "fix the symbolic link that points back "
                  "into itself"),
}  # fmt: skip


@contextmanager
def disk_errors(path: PathArg) -> Iterator[None]:
    """Turn a known filesystem refusal while writing ``path`` into one TLExtractError line."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        message = fault_message(e, path)
        if message is None:
            raise
        raise TLExtractError(message) from None


def fault_message(error: OSError | RuntimeError, writing: PathArg | None = None) -> str | None:
    """One line for a known filesystem refusal, or None: ``writing`` is the path being written,
    else the error's own file name is named (a path read or looked up)."""
    fault = _fault_of(error)
    if fault is None:
        return None
    what, fix = _DISK_FAULTS[fault]
    name = writing if writing is not None else getattr(error, "filename", None)
    blocker = in_the_way(Path(name)) if name and fault in (errno.EEXIST, errno.ENOTDIR) else None
    if blocker is not None:
        what = f"{blocker} is a file, not a directory"
    verb = "cannot write it" if writing is not None else "cannot use it"
    return f"{name}: {verb}: {what}; {fix}." if name else f"{what}; {fix}."


def in_the_way(path: Path) -> Path | None:
    """The nearest of ``path``'s parents that exists and is not a directory, if any."""
    return next((p for p in reversed(path.parents) if p.exists() and not p.is_dir()), None)


def _fault_of(error: OSError | RuntimeError) -> int | None:
    """The errno of a known refusal; libraries that write for us (pyarrow for datasets) may
    report one in their message only."""
    code = getattr(error, "errno", None)
    if code in _DISK_FAULTS:
        return code
    return next((c for c in _DISK_FAULTS if os.strerror(c) in str(error)), None)


def make_parents(directory: Path) -> list[Path]:
    """Create ``directory`` and its missing parents; return the ones created, deepest first."""
    missing = [d for d in (directory, *directory.parents) if not d.exists()]
    directory.mkdir(parents=True, exist_ok=True)
    return missing


def remove_empty(created: list[Path]) -> None:
    """Remove the directories ``created`` (deepest first) that are still empty: a failed write
    leaves no empty stage directory behind."""
    for d in created:
        with suppress(OSError):
            d.rmdir()


def _sibling(path: Path) -> Path:
    return path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"


@contextmanager
def atomic_path(path: PathArg) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it over ``path`` only on success.

    The temporary file is created like any new file (mode 0o666 less the umask, unlike
    ``mkstemp``'s 0o600), so a shared experiment directory stays readable by the group."""
    with _staged(path, _new_file) as tmp:
        yield tmp


def _new_file(path: Path) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))


@contextmanager
def atomic_dir(path: PathArg) -> Iterator[Path]:
    """Yield a fresh temporary directory (umask permissions); it replaces ``path`` (a
    directory) only on success."""
    with _staged(path, lambda tmp: tmp.mkdir(mode=0o777)) as tmp:
        yield tmp


@contextmanager
def _staged(target: PathArg, create: Callable[[Path], None]) -> Iterator[Path]:
    """A sibling of ``target`` made by ``create``, moved over it only on success. Whatever
    happens, no temporary is left, nor, on failure, a directory made for it; a filesystem
    refusal becomes one line (:func:`disk_errors`)."""
    path = Path(target)
    created: list[Path] = []
    tmp = _sibling(path)
    ok = False
    with disk_errors(path):
        try:
            created = make_parents(path.parent)
            create(tmp)
            yield tmp
            if tmp.is_dir() and path.exists():  # os.replace cannot replace a full directory
                shutil.rmtree(path)
            os.replace(tmp, path)
            ok = True
        finally:
            if tmp.is_dir():
                shutil.rmtree(tmp)
            else:  # never made when a file blocks its directory (ENOTDIR)
                with suppress(FileNotFoundError, NotADirectoryError):
                    tmp.unlink()
            if not ok:
                remove_empty(created)


def write_json(path: PathArg, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_text(path: PathArg, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def read_json(path: PathArg) -> Any:
    return json.loads(Path(path).read_text())


def save_tensors(path: PathArg, obj: Any) -> None:
    """torch.save, atomically. Serialised in memory first: torch's own writer reports a full
    disk as a RuntimeError without an errno, a plain write as ENOSPC."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())


def load_tensors(path: PathArg) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


def shard_dir(stage_dir: Path, key: str) -> Path:
    """Where a stage keeps per-batch results while running; named by fingerprint so a changed
    setting never resumes from results made with the old one."""
    return stage_dir / f"shards-{key}"


def clear_other_shards(stage_dir: Path, keep: str | None = None) -> None:
    """Remove leftover shard directories of other settings (or all, when ``keep`` is None)."""
    if not stage_dir.exists():
        return
    for d in stage_dir.glob("shards-*"):
        if d.name != f"shards-{keep}":
            shutil.rmtree(d)


def derive_seed(*parts: object) -> int:
    """A 60-bit seed from ``parts`` (e.g. experiment seed, trait, polarity, index): the same
    parts give the same seed on every machine and run, whatever else is in a batch."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()
    return int(digest[:15], 16)
