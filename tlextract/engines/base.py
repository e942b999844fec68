"""What the generate stage asks of an engine, and its identity in the stage's cache key."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from tlextract.config import EngineSettings, GenerationSettings
from tlextract.ops.generate import Generation


@runtime_checkable
class Engine(Protocol):
    tokenizer: PreTrainedTokenizerBase

    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        settings: GenerationSettings,
        seeds: Sequence[int],
    ) -> list[Generation]:
        """One response per prompt; ``seeds[i]`` alone decides prompt i's samples."""
        ...


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
