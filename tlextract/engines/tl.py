"""The TransformerLens engine: :func:`tlextract.ops.generate.generate_batch` on a loaded model,
recording ``capture`` hooks while it generates (combined mode)."""

from __future__ import annotations

from collections.abc import Sequence

from tlextract.config import GenerationSettings
from tlextract.model.decoding import Model
from tlextract.model.tokens import tokenizer_of
from tlextract.ops.generate import Generation, generate_batch


class TLEngine:
    def __init__(self, model: Model, capture: Sequence[str] = ()) -> None:
        self.model = model
        self.tokenizer = tokenizer_of(model)
        self.capture = list(capture)

    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        settings: GenerationSettings,
        seeds: Sequence[int],
    ) -> list[Generation]:
        return generate_batch(self.model, prompt_ids, settings, seeds, capture=self.capture)
