"""engine=vllm against the real vLLM (the CPU build `make vllm` installs in .venv-vllm; `make test`
builds it first): the server started and stopped on 127.0.0.1 by these tests, greedy responses
token-identical to the TransformerLens engine, vectors equal, sampled runs reproducible, and every
fault (no vLLM, unreachable, another model, a server that dies mid-run, an architecture vLLM cannot
load) one line with exit status 2 and nothing lost. No fake stands in for vLLM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from datasets import load_from_disk

import tlextract.engines.vllm_server as vllm_server
from tests.conftest import write_experiment
from tlextract.benchmarks import engine_speed
from tlextract.cli.main import main
from tlextract.config import EngineSettings, GenerationSettings, load_experiment
from tlextract.engines.tl import TLEngine
from tlextract.engines.vllm import vllm_engine
from tlextract.model.load import load_model, load_tokenizer, model_directory
from tlextract.model.tokens import tokenize
from tlextract.ops.trait_vectors import TraitVectors
from tlextract.settings import settings_for
from tlextract.stages.responses import responses_key
from tlextract.traits import build_examples

REPO = Path(__file__).resolve().parents[1]
SMOLLM2 = "smollm2-135m-instruct"


def _vllm_python() -> str:
    python = os.environ.get(vllm_server.ENV_PYTHON) or str(REPO / ".venv-vllm" / "bin" / "python")
    if not Path(python).is_file():
        if os.environ.get("CI"):
            pytest.fail(f"no vLLM environment at {python}: make test builds it (make vllm)")
        pytest.skip("no vLLM environment: run `make vllm` (make test does)")
    return python


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # nothing listens once the socket is closed


def _cli(root: Path, *args: str) -> list[str]:
    return ["run", "--experiment", "tiny", "--experiments-dir", str(root), "--traits", "alpha",
            *args]  # fmt: skip


# --- faults found before anything runs (no server needed) ---------------------------------------


def test_engine_vllm_without_vllm_is_one_line_and_writes_nothing(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    write_experiment(tmp_path)
    monkeypatch.setenv(vllm_server.ENV_PYTHON, str(tmp_path / "no-such-python"))
    assert main(_cli(tmp_path, "--engine", "vllm")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no-such-python" in err and "make vllm" in err
    # A Python without vLLM (this one, in a venv of tlextract's own).
    vllm_server._installed_version.cache_clear()
    monkeypatch.setenv(vllm_server.ENV_PYTHON, str(REPO / ".venv" / "bin" / "python"))
    if Path(os.environ[vllm_server.ENV_PYTHON]).is_file():
        assert main(_cli(tmp_path, "--engine", "vllm")) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "has no vLLM" in err
    assert not list((tmp_path / "tiny" / "alpha").glob("extraction*"))


def test_unreachable_server_is_one_line_and_writes_nothing(tmp_path: Path, capsys) -> None:
    write_experiment(tmp_path)
    url = f"http://127.0.0.1:{_closed_port()}/v1"
    assert main(_cli(tmp_path, "--vllm-url", url)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and url in err and "no vLLM server answers" in err
    assert not list((tmp_path / "tiny" / "alpha").glob("extraction*"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--engine", "vllm", "--mode", "combined"), "--mode two-stage"),
        (("--engine", "tl", "--vllm-url", "http://127.0.0.1:1/v1"), "--engine vllm"),
        (("--vllm-url", "127.0.0.1:8000"), "http://127.0.0.1:8000/v1"),
    ],
)
def test_impossible_engine_flags_are_refused(tmp_path: Path, capsys, args, message) -> None:
    write_experiment(tmp_path)
    assert main(_cli(tmp_path, *args)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


@pytest.mark.parametrize(
    ("engine", "field"),
    [
        ("vlm", "engine.kind"),
        ({"kind": "vllm", "tensor_parallel_size": 0}, "engine.tensor_parallel_size"),
        ({"kind": "vllm", "gpu_memory_utilization": 1.5}, "engine.gpu_memory_utilization"),
        ({"kind": "vllm", "base_url": "localhost:8000"}, "engine.base_url"),
        ({"kind": "vllm", "port": 8000}, "engine.port"),
        ({"kind": "vllm", "enforce_eager": "yes"}, "engine.enforce_eager"),
    ],
)
def test_malformed_engine_settings_name_the_field(tmp_path: Path, capsys, engine, field) -> None:
    write_experiment(tmp_path, engine=engine)
    assert main(_cli(tmp_path)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"'{field}'" in err and "experiment.json" in err


def test_engine_and_its_version_are_part_of_the_responses_key(tmp_path: Path, monkeypatch) -> None:
    exp = load_experiment("tiny", write_experiment(tmp_path).parent)
    tl = responses_key(settings_for(exp, "alpha"))
    keys = set()
    for version in ("0.32.0", "0.33.0"):
        monkeypatch.setattr(vllm_server, "vllm_version", lambda engine, v=version: v)
        keys.add(responses_key(settings_for(exp, "alpha", engine="vllm")))
    assert len(keys) == 2 and tl not in keys
    run = settings_for(exp, "alpha", engine="vllm")
    assert run.out_dir.name == "extraction-vllm"  # beside the TransformerLens run, not over it


def test_last_error_finds_the_root_cause_under_vllms_wrappers(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    log.write_text(
        "(EngineCore pid=1) ERROR ValueError: Model architectures ['NoSuch'] are not supported.\n"
        "(EngineCore pid=1) ERROR RuntimeError: Worker failed with error 'x', see above\n"
        "RuntimeError: Engine core initialization failed. See root cause above.\n"
    )
    assert vllm_server.last_error(log) == (
        "ValueError: Model architectures ['NoSuch'] are not supported."
    )
    assert vllm_server.last_error(tmp_path / "missing.log") == "no error message in its log"


# --- the real engine ------------------------------------------------------------------------------

GREEDY = GenerationSettings(max_new_tokens=24, do_sample=False)
SAMPLED = GenerationSettings(max_new_tokens=24, temperature=1.0, top_p=1.0, do_sample=True)


@pytest.fixture(scope="module")
def smollm2():
    return load_model(SMOLLM2)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A vLLM server of the embedded model on 127.0.0.1, started by tlextract's own code and
    stopped when the module's tests are done (eager: no compilation, a quicker start)."""
    engine = EngineSettings(kind="vllm", python=_vllm_python(), enforce_eager=True)
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    with vllm_server.managed_server(engine, model_directory(SMOLLM2), SMOLLM2, "float32", 1024,
                                    log) as client:  # fmt: skip
        yield client


def _prompts(model, n: int) -> list[list[int]]:
    exp = load_experiment("smollm2_cognitive", REPO / "experiments")
    examples = build_examples(exp.trait("local_global"), n, model.tokenizer, "chat", "natural")
    return tokenize(model, [e.prompt for e in examples], "chat")


def _engine(server):
    """The engine on the module's server (checked: model name and tokenizer)."""
    engine = EngineSettings(kind="vllm", base_url=server.root)
    return vllm_engine(engine, SMOLLM2, "float32", load_tokenizer(SMOLLM2), 1024, Path("unused"))


@pytest.mark.slow
def test_greedy_vllm_tokens_equal_transformerlens(server, smollm2) -> None:
    prompts = _prompts(smollm2, 8)  # 16 prompts, pos and neg
    seeds = list(range(len(prompts)))
    ours = TLEngine(smollm2).generate(prompts, GREEDY, seeds)
    with _engine(server) as vllm:
        theirs = vllm.generate(prompts, GREEDY, seeds)
    assert [g.response_ids for g in theirs] == [g.response_ids for g in ours]
    assert [g.stopped for g in theirs] == [g.stopped for g in ours]


@pytest.mark.slow
def test_sampled_vllm_generation_is_reproducible_for_a_seed(server, smollm2) -> None:
    prompts = _prompts(smollm2, 4)
    with _engine(server) as vllm:
        first = vllm.generate(prompts, SAMPLED, list(range(len(prompts))))
        again = vllm.generate(prompts[::-1], SAMPLED, list(range(len(prompts)))[::-1])[::-1]
        other = vllm.generate(prompts, SAMPLED, [s + 100 for s in range(len(prompts))])
    assert [g.response_ids for g in again] == [g.response_ids for g in first]
    assert [g.response_ids for g in other] != [g.response_ids for g in first]


@pytest.mark.slow
def test_a_server_of_another_model_is_refused(server, tmp_path: Path, capsys) -> None:
    write_experiment(tmp_path, engine={"kind": "vllm", "base_url": server.root + "/v1"})
    assert main(_cli(tmp_path)) == 2  # the experiment's model is tiny-random
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"serves {SMOLLM2}, not 'tiny-random'" in err
    # Told the served name is the run's model, the tokenizer check still tells them apart.
    write_experiment(tmp_path, engine={"kind": "vllm", "base_url": server.root + "/v1",
                                       "served_model": SMOLLM2})  # fmt: skip
    assert main(_cli(tmp_path)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "another tokenizer" in err
    assert not list((tmp_path / "tiny" / "alpha").glob("extraction*/responses/dataset"))


def _card(out: str) -> list[str]:
    """The result card without the wall time and the engine's name (directory, next commands)."""
    lines = [x for x in out.splitlines() if x.strip()]
    start = next(i for i, x in enumerate(lines) if "] done in" in x)
    engine = (("extraction-natural-vllm", "extraction-natural"), (" engine=vllm", ""),
              (" --engine vllm", ""))  # fmt: skip
    card = lines[start + 1 :]
    for old, new in engine:
        card = [x.replace(old, new) for x in card]
    return card


@pytest.mark.slow
def test_pipeline_vllm_equals_tl_and_resumes_after_the_server_dies(
    server, smollm2, tmp_path: Path, monkeypatch, capsys
) -> None:
    # long: one scenario: the TransformerLens reference, a managed server killed mid-run, resume
    root = tmp_path
    # enforce_eager: the server this test starts skips vLLM's compilation (a minute here).
    write_experiment(root, model=SMOLLM2, variant="natural", n_examples=8, batch_size=4,
                     generation={"max_new_tokens": 16, "do_sample": False},
                     engine={"kind": "tl", "enforce_eager": True})  # fmt: skip
    args = _cli(root)
    assert main(args) == 0
    reference = _card(capsys.readouterr().out)

    # A server tlextract starts for the stage, killed once the first batch is saved.
    monkeypatch.setenv(vllm_server.ENV_PYTHON, _vllm_python())
    started: list = []
    real_wait = vllm_server._wait_until_up

    def remember(proc, *a, **k):
        started.append(proc)
        return real_wait(proc, *a, **k)

    monkeypatch.setattr(vllm_server, "_wait_until_up", remember)
    out = root / "tiny" / "alpha" / "extraction-natural-vllm" / "responses"

    def kill_after_first_batch() -> None:
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline and not list(out.glob("shards-*/batch_*.pt")):
            time.sleep(0.2)
        if started:
            os.killpg(started[0].pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_after_first_batch, daemon=True)
    killer.start()
    assert main([*args, "--engine", "vllm"]) == 2
    killer.join()
    text = capsys.readouterr().err  # progress bars, then the one error line
    err = [x for x in text.splitlines() if x.startswith("error:")]
    assert "Traceback" not in text and len(err) == 1
    assert "did not answer" in err[0] and "resume" in err[0]
    kept = sorted(p.name for p in out.glob("shards-*/batch_*.pt"))
    assert kept and len(kept) < 4  # 16 examples in batches of 4: some, not all, were finished

    # The rerun, on the module's server (same vLLM version: the same key), resumes.
    assert main([*args, "--vllm-url", server.root + "/v1"]) == 0
    assert _card(capsys.readouterr().out) == reference
    meta = json.loads((out / "meta.json").read_text())
    assert meta["engine"]["kind"] == "vllm" and meta["engine"]["version"]
    tl_dir, vllm_dir = out.parents[1] / "extraction-natural", out.parent
    tl_rows = load_from_disk(str(tl_dir / "responses" / "dataset"))
    vllm_rows = load_from_disk(str(out / "dataset"))
    assert vllm_rows["response_ids"] == tl_rows["response_ids"]
    ours = TraitVectors.load(tl_dir / "vectors" / "mean_diff.pt").vectors
    theirs = TraitVectors.load(vllm_dir / "vectors" / "mean_diff.pt").vectors
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_a_model_vllm_cannot_run_is_one_line_with_the_cause(tmp_path: Path, capsys, monkeypatch):
    # The tiny test model loads in TransformerLens, but vLLM's CPU attention has no kernel for
    # its head size (16): the server starts, then its engine dies at the first request.
    write_experiment(tmp_path, engine={"kind": "vllm", "enforce_eager": True})
    monkeypatch.setenv(vllm_server.ENV_PYTHON, _vllm_python())
    assert main(_cli(tmp_path)) == 2
    text = capsys.readouterr().err
    err = [x for x in text.splitlines() if x.startswith("error:")]
    assert "Traceback" not in text and len(err) == 1
    assert "head_dim=16" in err[0] and "vllm-server.log" in err[0] and "--engine tl" in err[0]


@pytest.mark.slow
def test_engine_benchmark_tables_run_against_the_real_engine(server, smollm2, tmp_path) -> None:
    write_experiment(tmp_path, model=SMOLLM2, variant="natural", n_examples=2,
                     generation={"max_new_tokens": 4, "do_sample": False})  # fmt: skip
    exp = load_experiment("tiny", tmp_path)
    measured = engine_speed.measure(
        smollm2, "float32", _prompts(smollm2, 2), 4, (1, 2), (lambda b: exp, "alpha", 2, (2,)),
        tmp_path / "log", rounds=1, engine=EngineSettings(kind="vllm", base_url=server.root),
    )  # fmt: skip
    assert [r["batch"] for r in measured["alone"]] == [1, 2]
    assert all(r["tokens"] > 0 and r["tok_s"] > 0 for r in measured["alone"])
    [row] = measured["pipeline"]
    assert row["tokens"] > 0 and row["wall_s"] > 0 and row["engine"] == "vllm"
    text = "\n".join(engine_speed.render(measured, base_wall=2 * row["wall_s"]))
    assert "| 2 | vllm |" in text and "| 2.00x |" in text


def _vllm_pids() -> set[int]:
    """Processes of vLLM (its server and engine core) on this machine."""
    pids = set()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().decode(errors="replace")
        except OSError:
            continue
        if "vllm" in text.lower():
            pids.add(int(cmdline.parent.name))
    return pids


@pytest.mark.slow
def test_sigterm_during_vllm_generation_is_one_line_and_stops_the_server(tmp_path: Path) -> None:
    write_experiment(tmp_path, model=SMOLLM2, variant="natural", n_examples=8, batch_size=2,
                     generation={"max_new_tokens": 16, "do_sample": False},
                     engine={"kind": "vllm", "enforce_eager": True})  # fmt: skip
    before = _vllm_pids()
    err = tmp_path / "stderr.txt"
    env = {**os.environ, vllm_server.ENV_PYTHON: _vllm_python(), "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "tlextract", *_cli(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=err.open("w"), env=env)  # fmt: skip
    shards = tmp_path / "tiny" / "alpha" / "extraction-natural-vllm" / "responses"
    deadline = time.monotonic() + 600
    while not list(shards.glob("shards-*/batch_*.pt")):
        assert proc.poll() is None and time.monotonic() < deadline, err.read_text()
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143
    text = err.read_text()
    lines = [x for x in text.replace("\r", "\n").splitlines() if x.startswith("interrupted")]
    assert "Traceback" not in text and len(lines) == 1 and "resume" in lines[0]
    deadline = time.monotonic() + 60  # the server and its engine core are gone with it
    while _vllm_pids() - before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _vllm_pids() - before
