"""The engine choice: which engine generates a run's responses, how the stage batches for it,
and what of it goes into the stage's cache key. The one module that branches on the engine kind
(the layers below read the per-kind facts in :data:`tlextract.config.ENGINES`); a new engine is
a module of this package and a branch here."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from tlextract.config import EngineSettings
from tlextract.engines.base import Engine
from tlextract.engines.tl import TLEngine
from tlextract.engines.vllm import AUTO_BATCH, vllm_engine
from tlextract.model.accel import decode_session
from tlextract.model.decoding import Model
from tlextract.model.load import load_tokenizer
from tlextract.model.tokens import tokenizer_of
from tlextract.settings import RunSettings


@dataclass(frozen=True)
class Plan:
    """How the responses stage batches for its engine."""

    size: int  # examples per shard
    device: Any
    capture: list[str]  # hook names recorded while generating (combined mode), else none
    layers: list[int] | None  # combined mode: the layers recorded while generating
    acts_shape: tuple[int, int] | None  # combined mode: [hook, d_model] per response


# The TransformerLens engine's plan for a loaded model (its batch size and what it records).
ModelPlan = Callable[[Model], Plan]


def engine_identity(engine: EngineSettings) -> dict[str, Any] | None:
    """What of the engine decides the tokens: None for TransformerLens (so keys of runs made
    before engines existed are unchanged), else its kind, version and parallelism."""
    if engine.kind == "tl":
        return None
    from tlextract.engines.vllm_server import vllm_version  # subprocesses and HTTP: vllm only

    return {
        "kind": engine.kind,
        "version": vllm_version(engine),
        "tensor_parallel_size": engine.tensor_parallel_size,
    }


def starts_server(engine: EngineSettings) -> bool:
    """Whether generating with ``engine`` starts a server (it asks for most of the GPU)."""
    return engine.kind == "vllm" and not engine.base_url


def engine_tokenizer(run: RunSettings, get_model: Callable[[], Model]) -> PreTrainedTokenizerBase:
    """The tokenizer the run's prompts are written with: the model's for TransformerLens; for
    vLLM the tokenizer alone, so the TransformerLens model waits for the next stage."""
    return tokenizer_of(get_model()) if run.engine.kind == "tl" else load_tokenizer(run.model)


@contextmanager
def open_engine(
    run: RunSettings,
    get_model: Callable[[], Model],
    tokenizer: PreTrainedTokenizerBase,
    longest: int,
    stage: Path,
    model_plan: ModelPlan,
) -> Iterator[tuple[Engine, Plan]]:
    """The run's engine for the responses stage (writing into ``stage``), and how the stage
    batches for it; ``longest``: the tokens of the longest prompt and its response."""
    if run.engine.kind == "vllm":
        size = AUTO_BATCH if run.batch_size == "auto" else run.batch_size
        log_path = stage / "vllm-server.log"
        with vllm_engine(run.engine, run.model, run.dtype, tokenizer, longest, log_path) as vllm:
            yield vllm, Plan(size, "cpu", [], None, None)
        return
    model = get_model()
    plan = model_plan(model)
    # One decode session for the stage: packed weights are checked once, not once per batch.
    with decode_session(model):
        yield TLEngine(model, plan.capture), plan
