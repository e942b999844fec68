"""What the responses stage asks of an engine (:mod:`.registry` chooses and opens one)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from tlextract.config import GenerationSettings
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
