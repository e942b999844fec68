"""The Makefile's vLLM build, read with `make -n` (nothing runs) in a copy of the Makefile: the
CUDA build where `nvidia-smi -L` answers, the CPU build where it fails, a rebuild exactly when
VLLM changes, and bench-gpu building it first."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MAKEFILE = (REPO / "Makefile").read_text()
CPU = re.search(r"^VLLM_CPU := (\S+)$", MAKEFILE, re.MULTILINE)
CUDA = re.search(r"^VLLM_CUDA := (\S+)$", MAKEFILE, re.MULTILINE)

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="GNU make is not installed")


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """The Makefile and pyproject.toml, with the main venv's stamp up to date."""
    shutil.copy(REPO / "Makefile", tmp_path)
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    (tmp_path / ".venv").mkdir()
    (tmp_path / ".venv" / ".installed").touch()
    return tmp_path


def _nvidia_smi(root: Path, status: int) -> dict[str, str]:
    """An environment whose nvidia-smi (first on PATH) exits with ``status``."""
    bin_dir = root / f"bin{status}"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "nvidia-smi"
    fake.write_text(f"#!/bin/sh\necho 'GPU 0: fake (UUID: GPU-0)'\nexit {status}\n")
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("VLLM", "MAKEFLAGS")}
    return {**env, "PATH": f"{bin_dir}{os.pathsep}{env['PATH']}"}


def _dry_run(root: Path, env: dict[str, str], *args: str) -> str:
    done = subprocess.run(["make", "-n", *args], cwd=root, env=env, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


def _installs(out: str) -> list[str]:
    return re.findall(r"-m pip install -q '([^']+)'", out)


def test_the_vllm_build_follows_the_gpu(checkout: Path) -> None:
    assert CPU and CUDA and CPU[1] != CUDA[1]
    assert _installs(_dry_run(checkout, _nvidia_smi(checkout, 0), "vllm")) == [CUDA[1]]
    assert _installs(_dry_run(checkout, _nvidia_smi(checkout, 9), "vllm")) == [CPU[1]]


def test_a_changed_vllm_spec_rebuilds_and_the_same_one_does_not(checkout: Path) -> None:
    assert CPU
    env = _nvidia_smi(checkout, 9)
    (checkout / ".venv-vllm").mkdir()
    (checkout / ".venv-vllm" / ".installed").write_text(f"{CPU[1]}\n")  # what a build writes
    assert _installs(_dry_run(checkout, env, "vllm")) == []
    assert _installs(_dry_run(checkout, env, "vllm", "VLLM=vllm==0.31.0")) == ["vllm==0.31.0"]
    # An older stamp (an empty file) records no spec: rebuilt once.
    (checkout / ".venv-vllm" / ".installed").write_text("")
    assert _installs(_dry_run(checkout, env, "vllm")) == [CPU[1]]


def test_bench_gpu_builds_vllm_first(checkout: Path) -> None:
    out = _dry_run(checkout, _nvidia_smi(checkout, 0), "bench-gpu")
    assert CUDA and _installs(out) == [CUDA[1]]
    assert out.index(CUDA[1]) < out.index("test_gpu_speed.py")
