"""``run --backend ray`` on a local Ray cluster started here (2 CPUs, so 2 actors): the tasks make
the same vectors as the local backend, a task whose process is killed mid-stage is retried and
ends the same, and a rerun does no work."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import write_experiment

from tlextract.backends.ray import TASK_LOG, run_on_ray
from tlextract.cli.main import main
from tlextract.config import load_experiment
from tlextract.errors import TLExtractError
from tlextract.locks import run_lock
from tlextract.ops.trait_vectors import TraitVectors
from tlextract.settings import STAGES, report_dir, settings_for
from tlextract.traits import VARIANTS

pytestmark = pytest.mark.usefixtures("one_thread")
TRAITS = ["alpha", "beta", "gamma"]


def _crash_once_when_armed(marker: Path) -> Callable[[], None]:
    """A Ray worker setup hook: while ``marker`` exists, the first worker to save a shard (one
    batch of a stage, so the stage is half done) deletes the marker and dies on the spot."""

    def hook() -> None:
        import tlextract.stages.common as common

        save = common.save_tensors

        def save_then_die(path: Path, obj: object) -> None:
            save(path, obj)
            if path.parent.name.startswith("shards-"):
                try:
                    os.remove(marker)  # only one process wins the crash
                except FileNotFoundError:
                    return
                os._exit(1)

        common.save_tensors = save_then_die

    return hook


def _spy_on_vllm_starts(record: Path) -> Callable[[], None]:
    """A Ray worker setup hook: a managed vLLM server's start (engine=vllm) appends to ``record``
    how many TransformerLens models with parameters are alive in the worker then (what would sit
    on its GPU), and the spy answers with fixed tokens (tests/test_vllm_resident.py in-process)."""

    def hook() -> None:
        import gc
        from contextlib import contextmanager

        from transformer_lens import HookedTransformer

        import tlextract.engines.vllm as engine
        import tlextract.engines.vllm_server as server
        from tlextract.engines.vllm_client import VLLMClient
        from tlextract.ops.generate import Generation

        class Client(VLLMClient):
            def check_model(self, tokenizer: object, model: str) -> None:
                pass

            def generate(self, prompt_ids: list, *args: object) -> list:
                return [Generation([40 + i % 7, 50, 60], stopped=False)
                        for i in range(len(prompt_ids))]  # fmt: skip

        @contextmanager
        def spy(*args: object, **kwargs: object):
            gc.collect()
            live = sum(issubclass(type(o), HookedTransformer) and next(o.parameters(), None)
                       is not None for o in gc.get_objects())  # fmt: skip
            with open(record, "a") as f:
                f.write(f"{live}\n")
            yield Client("http://127.0.0.1:9", "tiny-random", 1.0, "the spy server")

        engine.managed_server = spy
        server.vllm_version = lambda engine: "0.32.0"

    return hook


@pytest.fixture(scope="module")
def crash_marker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ray") / "crash_armed"


@pytest.fixture(scope="module")
def vllm_starts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ray") / "vllm_starts"


@pytest.fixture(scope="module")
def ray_cluster(crash_marker: Path, vllm_starts: Path):
    ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install '.[ray]'")
    hooks = (_crash_once_when_armed(crash_marker), _spy_on_vllm_starts(vllm_starts))
    ray.init(
        address="local",  # never a cluster named by $RAY_ADDRESS
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"worker_process_setup_hook": lambda: [hook() for hook in hooks]},
    )
    yield ray
    ray.shutdown()


def _run_cli(root: Path, *extra: str) -> int:
    return main(
        ["run", "--experiment", "tiny", "--experiments-dir", str(root), "--traits", "all", *extra]
    )


def _vectors(root: Path) -> dict[str, TraitVectors]:
    return {
        str(p.relative_to(root)): TraitVectors.load(p)
        for p in sorted(root.glob("tiny/*/extraction*/vectors/mean_diff.pt"))
    }


def _assert_same_vectors(local: Path, remote: Path, n: int) -> None:
    a, b = _vectors(local), _vectors(remote)
    assert a.keys() == b.keys() and len(a) == n
    for name in a:
        assert torch.equal(a[name].vectors, b[name].vectors), name
        assert a[name].metadata["n_pos"] == b[name].metadata["n_pos"]


def _mtimes(root: Path) -> dict[Path, int]:
    return {
        p: p.stat().st_mtime_ns
        for p in root.glob("tiny/*/extraction*/**/*")
        if p.is_file() and p.name != TASK_LOG
    }


@pytest.mark.slow
def test_ray_tasks_match_the_local_backend_and_a_rerun_does_no_work(
    tmp_path: Path, ray_cluster, capsys
) -> None:
    local, remote = tmp_path / "local", tmp_path / "ray"
    for root in (local, remote):
        write_experiment(root, traits=TRAITS)
    assert _run_cli(local, "--variant", "all") == 0
    assert _run_cli(remote, "--variant", "all", "--backend", "ray") == 0
    _assert_same_vectors(local, remote, n=6)

    out = capsys.readouterr().out
    assert "[ray] 6 tasks on 2 actors" in out
    assert "6 done, 0 running, 0 failed, 0 waiting" in out
    rows = json.loads((remote / "tiny" / "report" / "ray_summary.json").read_text())
    assert [(r["trait"], r["variant"]) for r in rows] == [(t, v) for v in VARIANTS for t in TRAITS]
    assert all(r["status"] == "done" and r["stages_run"] == list(STAGES) for r in rows)
    assert all(r["kept"] == {"pos": 6, "neg": 6} and r["best_layer"] is not None for r in rows)
    # The Ray summary names the layer the local run's result card named (one rule).
    exp = load_experiment("tiny", local)
    for r in rows:
        card = report_dir(settings_for(exp, r["trait"], variant=r["variant"])) / "crossval.json"
        assert json.loads(card.read_text())["layer"]["mean_diff"] == r["best_layer"]
    # Six tasks on two actors: each actor loads the model at most once and reuses it.
    assert sum(r["loaded_model"] for r in rows) <= len({r["pid"] for r in rows}) == 2
    assert "attempt at" in Path(rows[0]["log"]).read_text()  # per-task log
    assert "| alpha | instruction | 6/6 |" in (remote / "tiny/report/ray_summary.md").read_text()

    before = _mtimes(remote)
    assert _run_cli(remote, "--variant", "all", "--backend", "ray") == 0
    rows = json.loads((remote / "tiny" / "report" / "ray_summary.json").read_text())
    assert all(r["stages_run"] == [] and not r["loaded_model"] for r in rows)
    assert _mtimes(remote) == before


@pytest.mark.slow
def test_a_task_killed_mid_stage_is_retried_and_ends_with_the_same_vectors(
    tmp_path: Path, ray_cluster, crash_marker: Path
) -> None:
    local, remote = tmp_path / "local", tmp_path / "ray"
    for root in (local, remote):
        write_experiment(root, traits=TRAITS)
    assert _run_cli(local) == 0
    exp = load_experiment("tiny", remote)
    crash_marker.touch()
    rows = run_on_ray([settings_for(exp, t, variant="instruction") for t in TRAITS])
    assert not crash_marker.exists(), "no worker was killed"
    assert all(r["status"] == "done" for r in rows)
    attempts = sorted(Path(r["log"]).read_text().count("attempt at") for r in rows)
    assert attempts == [1, 1, 2]
    _assert_same_vectors(local, remote, n=3)


@pytest.mark.slow
def test_more_gpus_per_task_than_the_cluster_has_is_a_clear_error(
    experiments: Path, ray_cluster
) -> None:
    run = settings_for(load_experiment("tiny", experiments), "alpha")
    with pytest.raises(TLExtractError, match="lower --gpus-per-task"):
        run_on_ray([run], gpus_per_task=1.0)


def test_ray_backend_without_ray_says_how_to_install_it(
    experiments: Path, monkeypatch, capsys
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    assert _run_cli(experiments, "--backend", "ray") == 2
    assert "pip install 'tlextract[ray]'" in capsys.readouterr().err


@pytest.mark.slow
def test_a_failing_task_is_reported_and_the_others_finish(
    tmp_path: Path, ray_cluster, capsys
) -> None:
    exp = write_experiment(tmp_path, traits=["alpha", "broken"])
    for side in ("pos", "neg"):  # fails inside the task: no natural prompts to build examples
        (exp / "broken" / f"natural_{side}.txt").unlink()
    assert _run_cli(tmp_path, "--variant", "natural", "--backend", "ray") == 2
    out, err = capsys.readouterr()
    assert "1 done, 0 running, 1 failed, 0 waiting" in out
    assert "1 of 2 Ray tasks failed" in err and "broken/extraction-natural/ray_task.log" in err
    ok, failed = json.loads((exp / "report" / "ray_summary.json").read_text())
    assert ok["status"] == "done" and failed["status"] == "failed"
    assert "natural_pos.txt" in failed["error"]
    assert "Traceback" in Path(failed["log"]).read_text()


@pytest.mark.slow
def test_two_tasks_of_one_run_at_once_write_it_one_after_the_other(
    tmp_path: Path, ray_cluster
) -> None:
    local, remote = tmp_path / "local", tmp_path / "ray"
    for root in (local, remote):
        write_experiment(root, traits=["alpha"])
    assert _run_cli(local) == 0
    run = settings_for(load_experiment("tiny", remote), "alpha")
    log = run.out_dir / TASK_LOG
    rows: list[dict] = []
    # Held here until both tasks (one on each actor) wait for it, so they then race for it.
    with run_lock(run.out_dir):
        both = threading.Thread(target=lambda: rows.extend(run_on_ray([run, run])))
        both.start()
        deadline = time.monotonic() + 300
        while not (log.exists() and log.read_text().count("waiting (use --no-wait") == 2):
            assert time.monotonic() < deadline and both.is_alive(), "both tasks never waited"
            time.sleep(0.1)
    both.join(timeout=300)
    assert [r["status"] for r in rows] == ["done", "done"]
    text = log.read_text()
    assert text.count("responses: up to date, skipped") == 1, text  # the second found it done
    assert "Traceback" not in text
    _assert_same_vectors(local, remote, n=1)


@pytest.mark.slow
def test_actors_drop_their_models_before_a_vllm_server_starts(
    tmp_path: Path, ray_cluster, vllm_starts: Path, monkeypatch
) -> None:
    """Four traits on two actors: each actor's later tasks start a server after an earlier task
    loaded the model (the activations pass); none may still hold it then."""
    import tlextract.engines.vllm_server as vllm_server

    monkeypatch.setattr(vllm_server, "vllm_version", lambda engine: "0.32.0")  # the driver's keys
    write_experiment(tmp_path, traits=[*TRAITS, "delta"])
    vllm_starts.unlink(missing_ok=True)
    args = ("--variant", "instruction", "--backend", "ray", "--engine", "vllm", "--judge", "none",
            "--layers", "1-2")  # fmt: skip
    assert _run_cli(tmp_path, *args) == 0
    rows = json.loads((tmp_path / "tiny" / "report" / "ray_summary.json").read_text())
    assert [r["status"] for r in rows] == ["done"] * 4
    assert vllm_starts.read_text().split() == ["0"] * 4


@pytest.mark.slow
def test_actors_without_gpus_see_none(tmp_path: Path, ray_cluster) -> None:
    import ray

    from tlextract.backends import ray as ray_backend

    run_on_ray([settings_for(load_experiment("tiny", write_experiment(tmp_path).parent), "alpha")],
               gpus_per_task=0.0)  # fmt: skip
    actors = [a for (_, gpus, _), idle in ray_backend._IDLE.items() if not gpus for a in idle]
    seen = ray.get([a.__ray_call__.remote(lambda self: os.environ.get("CUDA_VISIBLE_DEVICES"))
                    for a in actors])  # fmt: skip
    assert actors and seen == [""] * len(actors)
