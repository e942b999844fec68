"""The vLLM engine: prompts go to a vLLM server as token ids, responses come back as token ids,
one seed per example; a server tlextract starts for the stage (``engine.base_url`` unset) or one
already running (checked to serve the run's model with the same tokenizer)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from tlextract.config import EngineSettings, GenerationSettings
from tlextract.engines.vllm_client import VLLMClient
from tlextract.engines.vllm_server import managed_server
from tlextract.model.load import model_directory
from tlextract.model.tokens import stop_token_ids
from tlextract.ops.generate import Generation

# Requests a generate shard sends at once with --batch-size auto: vLLM's scheduler packs its
# KV cache itself, so the shard size only bounds what a crash can lose.
AUTO_BATCH = 64


class VLLMEngine:
    def __init__(self, client: VLLMClient, tokenizer: PreTrainedTokenizerBase) -> None:
        self.client = client
        self.tokenizer = tokenizer
        self.stops = stop_token_ids(tokenizer)

    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        settings: GenerationSettings,
        seeds: Sequence[int],
    ) -> list[Generation]:
        return self.client.generate(prompt_ids, settings, seeds, self.stops)


def max_model_len(longest: int) -> int:
    """A context length for the server: what the longest row needs, rounded up to 512 so runs
    of one model reuse vLLM's compilation cache."""
    return max(1024, -(-longest // 512) * 512)


@contextmanager
def vllm_engine(
    engine: EngineSettings,
    model: str,
    dtype: str,
    tokenizer: PreTrainedTokenizerBase,
    longest: int,
    log_path: Path,
) -> Iterator[VLLMEngine]:
    """A checked engine for ``model``; a server started here is stopped when the block ends."""
    served = engine.served_model or model
    if engine.base_url:
        what = f"the vLLM server at {engine.base_url}"
        client = VLLMClient(engine.base_url, served, float(engine.request_timeout), what)
        client.check_model(tokenizer, model)
        yield VLLMEngine(client, tokenizer)
        return
    directory = model_directory(model)
    with managed_server(
        engine, directory, served, dtype, max_model_len(longest), log_path
    ) as client:
        client.check_model(tokenizer, model)
        yield VLLMEngine(client, tokenizer)
