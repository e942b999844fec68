"""The Makefile's browser setup, read with `make -n` in a copy of the Makefile: Debian's chromium
is installed exactly when the binary is missing, and `make test` sets it up first."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from test_makefile_vllm import checkout  # noqa: F401 (fixture)

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="GNU make is not installed")
INSTALL = "apt-get install -y -qq chromium"


def _dry_run(root: Path, chromium: Path, *targets: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "MAKEFLAGS"}
    done = subprocess.run(
        # Under `make test`, MAKELEVEL makes this a sub-make that names its directory.
        ["make", "-n", "--no-print-directory", f"CHROMIUM={chromium}", *targets],
        cwd=root, env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return done.stdout


def test_chromium_is_installed_only_where_it_is_missing(checkout: Path) -> None:  # noqa: F811
    missing = _dry_run(checkout, checkout / "no-chromium", "browser")
    assert "apt-get update -qq" in missing and INSTALL in missing
    # Not root: through sudo.
    assert ("sudo" in missing) == (os.getuid() != 0)
    present = checkout / "chromium"
    present.write_text("#!/bin/sh\necho Chromium 1\n")
    present.chmod(0o755)
    subprocess.run(["make", f"CHROMIUM={present}", "browser"], cwd=checkout, check=True)
    assert (checkout / ".venv" / ".installed-browser").exists()
    assert "apt-get" not in _dry_run(checkout, present, "browser")
    # The binary gone: the stamp does not hide it, and the recipe really runs apt-get (here
    # through a SUDO that logs what it was asked to run).
    sudo = checkout / "log-sudo"
    sudo.write_text(f'#!/bin/sh\necho "$*" >> {checkout / "sudo.log"}\n')
    sudo.chmod(0o755)
    run = ["make", f"CHROMIUM={checkout / 'gone'}", f"SUDO={sudo}", "browser"]
    assert subprocess.run(run, cwd=checkout, capture_output=True).returncode != 0
    assert (checkout / "sudo.log").read_text().splitlines() == [
        "apt-get update -qq",
        f"env DEBIAN_FRONTEND=noninteractive {INSTALL}",
    ]


def test_make_test_sets_up_the_browser_first(checkout: Path) -> None:  # noqa: F811
    # The Ray and vLLM stamps up to date, so only the browser is left to set up.
    (checkout / ".venv" / ".installed-ray").touch()
    (checkout / ".venv-vllm").mkdir()
    (checkout / ".venv-vllm" / ".installed").write_text("vllm-spec\n")
    out = _dry_run(checkout, checkout / "no-chromium", "test", "VLLM=vllm-spec")
    assert out.index(INSTALL) < out.index("-m pytest")
