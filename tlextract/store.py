"""On-disk layout helpers: atomic writes, settings fingerprints, per-stage metadata.

Every file is written to a temporary sibling and renamed into place, so a reader (or a resumed run)
only ever sees complete files. A stage is finished when its ``meta.json`` exists and records the
fingerprint of the settings and inputs that produced it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

META = "meta.json"


def fingerprint(obj: Any) -> str:
    """A short stable hash of JSON-serialisable settings."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it over ``path`` only on success."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a fresh temporary directory; it replaces ``path`` (a directory) only on success."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def write_json(path: Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def save_tensors(path: Path, obj: Any) -> None:
    """torch.save, atomically."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_tensors(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


def stage_done(stage_dir: Path, key: str) -> bool:
    """True when the stage in ``stage_dir`` finished with the settings fingerprint ``key``."""
    meta = stage_dir / META
    return meta.exists() and read_json(meta).get("fingerprint") == key


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
