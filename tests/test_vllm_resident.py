"""No TransformerLens model is resident when a managed vLLM server starts (it asks for 85% of the
GPU and refuses to start beside one): one trait with layers set, several traits in one command,
and a Ray actor that keeps its models across tasks.

The server's start is replaced by a spy that records, at that moment, every HookedTransformer
with parameters still alive (after a garbage collection) that was not alive before the test: on
this CPU a live model is what would sit on the GPU there. The spy then answers with fixed
tokens, so the stages after generation run for real (and load the model, after the server)."""

from __future__ import annotations

import gc
import sys
import types
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest
from transformer_lens import HookedTransformer

import tlextract.engines.vllm as vllm_engine
import tlextract.engines.vllm_server as vllm_server
from tests.conftest import write_experiment
from tlextract.backends.ray import TraitWorker
from tlextract.cli.main import main
from tlextract.config import load_experiment
from tlextract.engines.vllm_client import VLLMClient
from tlextract.model.load import load_model
from tlextract.ops.generate import Generation
from tlextract.settings import STAGES, settings_for
from tlextract.stages.run import layer_count

pytestmark = pytest.mark.usefixtures("one_thread")


def _live_models() -> set[int]:
    gc.collect()
    return {
        id(o)
        for o in gc.get_objects()
        if issubclass(type(o), HookedTransformer) and next(o.parameters(), None) is not None
    }


class _Client(VLLMClient):
    """What the generate stage asks of a server: a model check, and responses (fixed tokens)."""

    def __init__(self) -> None:
        super().__init__("http://127.0.0.1:9", "tiny-random", 1.0, "the spy server")

    def check_model(self, tokenizer: object, model: str) -> None:
        pass

    def generate(self, prompt_ids: Sequence[Sequence[int]], *args: object) -> list[Generation]:
        return [Generation([40 + i % 7, 50, 60], stopped=False) for i in range(len(prompt_ids))]


@pytest.fixture
def starts(monkeypatch) -> list[set[int]]:
    """One entry per managed server start: the models resident then (ids)."""
    before = _live_models()  # e.g. a session-scoped model another test module loaded
    seen: list[set[int]] = []

    @contextmanager
    def spy(*args: object, **kwargs: object) -> Iterator[_Client]:
        seen.append(_live_models() - before)
        yield _Client()

    monkeypatch.setattr(vllm_engine, "managed_server", spy)
    monkeypatch.setattr(vllm_server, "vllm_version", lambda engine: "0.32.0")
    return seen


def _cli(root: Path, traits: str) -> list[str]:
    return ["run", "--experiment", "tiny", "--experiments-dir", str(root), "--traits", traits,
            "--engine", "vllm", "--judge", "none", "--layers", "1-2"]  # fmt: skip


def test_layers_are_checked_from_the_config(tmp_path: Path) -> None:
    assert layer_count("tiny-random") == load_model("tiny-random", fast=False).cfg.n_layers


def test_one_trait_with_layers_set_starts_vllm_with_no_model_resident(
    tmp_path: Path, starts: list[set[int]]
) -> None:
    write_experiment(tmp_path)
    assert main(_cli(tmp_path, "alpha")) == 0
    assert starts == [set()]


def test_several_traits_drop_the_kept_model_before_each_server(
    tmp_path: Path, starts: list[set[int]]
) -> None:
    write_experiment(tmp_path)
    assert main(_cli(tmp_path, "alpha,beta")) == 0
    assert starts == [set(), set()]


def test_a_ray_actor_drops_its_models_before_each_server(
    tmp_path: Path, starts: list[set[int]], monkeypatch
) -> None:
    """The actor class run in this process (the code Ray runs in its worker; ``ray`` itself only
    answers the GPU ids there). tests/test_ray_backend.py runs it under a real Ray."""
    monkeypatch.setitem(sys.modules, "ray", types.SimpleNamespace(get_gpu_ids=lambda: []))
    exp = load_experiment("tiny", write_experiment(tmp_path).parent)
    worker = TraitWorker(threads=1)
    rows = [
        worker.run(settings_for(exp, t, engine="vllm", judge="none", layers=[1, 2]), STAGES)
        for t in ("alpha", "beta")
    ]
    assert starts == [set(), set()]
    assert [r["loaded_model"] for r in rows] == [True, True]  # beta's model: loaded again
