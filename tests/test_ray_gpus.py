"""``run --backend ray`` on GPUs, proven on this CPU without Ray: the actor class runs in this
process with ``ray`` answering only its GPU ids (tests/test_ray_backend.py runs it under a real
Ray). An actor that holds no GPU sees none and loads onto the CPU, actors sharing a GPU split one
memory budget, and a tensor_parallel_size above the GPUs a task holds is one line, exit 2,
before anything runs."""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch

import tlextract.backends.ray as ray_backend
from tests.conftest import write_experiment
from tlextract.backends.ray import TraitWorker, run_on_ray
from tlextract.cli.main import main
from tlextract.config import load_experiment
from tlextract.model.memory import GiB
from tlextract.settings import STAGES, settings_for

pytestmark = pytest.mark.usefixtures("one_thread")


def _fake_ray(monkeypatch, gpu_ids: list[int], **more: Any) -> types.SimpleNamespace:
    ray = types.SimpleNamespace(get_gpu_ids=lambda: gpu_ids, **more)
    monkeypatch.setitem(sys.modules, "ray", ray)
    return ray


def test_an_actor_without_a_gpu_loads_on_the_cpu_where_cuda_is_seen(
    tmp_path: Path, monkeypatch
) -> None:
    _fake_ray(monkeypatch, [])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # every GPU of the node
    exp = load_experiment("tiny", write_experiment(tmp_path).parent)
    worker = TraitWorker(1)
    row = worker.run(settings_for(exp, "alpha", judge="none"), STAGES)
    assert row["device"] == "cpu" and row["loaded_model"]
    assert [str(m.cfg.device) for m in worker.models.values()] == ["cpu"]


class _Refused(Exception):
    pass


@pytest.mark.parametrize("gpus, hidden", [(0.0, True), (1.0, False), (0.5, False)])
def test_ray_hides_the_gpus_from_actors_that_hold_none(
    tmp_path: Path, monkeypatch, gpus: float, hidden: bool
) -> None:
    asked: dict[str, Any] = {}

    def remote(**options: Any) -> Any:
        asked.update(options)
        raise _Refused  # the actor's options are all this test reads

    _fake_ray(monkeypatch, [], is_initialized=lambda: True, remote=remote,
              cluster_resources=lambda: {"GPU": 2.0, "CPU": 4.0})  # fmt: skip
    exp = load_experiment("tiny", write_experiment(tmp_path).parent)
    with pytest.raises(_Refused):
        run_on_ray([settings_for(exp, "alpha")], gpus_per_task=gpus)
    env = asked.get("runtime_env", {}).get("env_vars", {})
    assert asked["num_gpus"] == gpus and (env.get("CUDA_VISIBLE_DEVICES") == "") == hidden


def test_actors_sharing_a_gpu_split_its_memory_budget(tmp_path: Path, monkeypatch) -> None:
    _fake_ray(monkeypatch, [0])
    free = 8 * GiB  # what memory.default_budget gives one process on this GPU
    monkeypatch.setattr(ray_backend, "default_budget", lambda device: free)
    budgets: list[float | None] = []
    monkeypatch.setattr(ray_backend, "run_trait",
                        lambda run, *a, **k: budgets.append(run.memory_budget_gib))  # fmt: skip
    exp = load_experiment("tiny", write_experiment(tmp_path).parent)
    for trait in ("alpha", "beta"):  # two actors, half a GPU each
        run = settings_for(exp, trait, batch_size="auto", device="cpu")
        TraitWorker(1, 0.5).run(run, STAGES)
    assert budgets == [4.0, 4.0] and sum(budgets) * GiB == free


def test_tensor_parallel_beyond_the_gpus_of_a_task_is_one_line(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    monkeypatch.delitem(sys.modules, "ray", raising=False)
    monkeypatch.setattr("builtins.__import__", _no_ray(__import__))  # nothing may start Ray
    write_experiment(tmp_path, engine={"kind": "vllm", "tensor_parallel_size": 2})
    code = main(["run", "--experiment", "tiny", "--experiments-dir", str(tmp_path),
                 "--backend", "ray", "--gpus-per-task", "1"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "tensor_parallel_size 2" in err and "--gpus-per-task 2" in err
    assert not list(tmp_path.rglob("extraction*"))


def _no_ray(real: Any) -> Any:
    def imp(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "ray":
            raise AssertionError("Ray imported before the refusal")
        return real(name, *args, **kwargs)

    return imp
