"""The computation of a trait run, written once: generate -> pool (fit is
:func:`tlextract.ops.methods.run_method`).

The stages run it batch by batch through :func:`tlextract.stages.common.run_sharded` (each batch
saved as a shard, resumed, checked); ``tx.extract`` through :func:`in_memory` (the same batches,
nothing written). Combined vs two-stage is decided here alone, by :class:`Capture`: combined
records the residual while generating, two-stage reads it in a teacher-forced pass afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch
from torch import Tensor

from tlextract.config import GenerationSettings
from tlextract.engines.base import Engine
from tlextract.model.decoding import Model
from tlextract.model.memory import HalvingBatches
from tlextract.ops.pool import hook_name, pooled_activations, resolve_layers
from tlextract.settings import Mode
from tlextract.stages.common import run_sharded

Key = tuple[str, int]  # (polarity, example index)


@dataclass(frozen=True)
class Capture:
    """Where the pooled residual comes from: ``hook`` at ``layers``, recorded while
    generating (``mode == "combined"``) or by a teacher-forced pass afterwards."""

    mode: Mode
    hook: str
    layers: tuple[int, ...]

    @classmethod
    def of(
        cls, mode: Mode, hook: str, layers: Sequence[int] | Literal["all"], n_layers: int
    ) -> Capture:
        """``layers`` as a run or ``extract`` gives them ("all" or block indices), checked."""
        return cls(mode, hook, resolve_layers(layers, n_layers))

    @property
    def combined(self) -> bool:
        return self.mode == "combined"

    @property
    def while_generating(self) -> list[str]:
        """The hook names the engine records during generation (none in two-stage mode)."""
        return [hook_name(self.hook, layer) for layer in self.layers] if self.combined else []


# Runs ``compute`` over items grouped in batches (lengths, size, compute, to_shard, device, desc,
# valid): returns what ``to_shard`` made of each batch, in batch order, and the halving state.
# :func:`tlextract.stages.common.run_sharded` bound to a stage's shards, or to none (in memory).
Shards = Callable[..., tuple[list[Any], HalvingBatches]]


in_memory: Shards = partial(run_sharded, None)  # the stages' batches, nothing written


def generate_records(
    engine: Engine,
    tokenizer: Any,
    prompt_ids: Sequence[list[int]],
    meta: Sequence[Mapping[str, Any]],
    seeds: Sequence[int],
    gen: GenerationSettings,
    size: int,
    shards: Shards,
    device: Any,
    desc: str,
    acts_shape: tuple[int, int] | None,
) -> tuple[list[dict[str, Any]], HalvingBatches]:
    """One record per prompt (``meta[i]`` merged in; it must hold ``polarity`` and ``index``):
    its response ids and text, token counts, whether it stopped, and (combined mode,
    ``acts_shape`` = [hook, d_model]) ``acts``, the residual recorded while generating."""

    def compute(chunk: list[int]) -> list:
        return engine.generate([prompt_ids[i] for i in chunk], gen, [seeds[i] for i in chunk])

    def to_shard(idx: list[int], gens: list) -> list[dict[str, Any]]:
        return [
            {**meta[i], "prompt_ids": list(prompt_ids[i]), "response_ids": g.response_ids,
             "response": tokenizer.decode(g.response_ids, skip_special_tokens=True),
             "n_prompt_tokens": len(prompt_ids[i]), "n_response_tokens": len(g.response_ids),
             "stopped": g.stopped, "acts": g.pooled}
            for i, g in zip(idx, gens, strict=True)
        ]  # fmt: skip

    lengths = [len(p) for p in prompt_ids]
    contents, halving = shards(lengths, size, compute, to_shard, device, desc,
                               _records_check(meta, acts_shape))  # fmt: skip
    return [r for shard in contents for r in shard], halving


def _records_check(
    meta: Sequence[Mapping[str, Any]], acts_shape: tuple[int, int] | None
) -> Callable[[list[int], Any], bool]:
    """Whether a saved shard holds the records of its batch's prompts, in order (and, in
    combined mode, their activations with ``acts_shape``)."""

    def acts_ok(acts: Any, empty: bool) -> bool:  # an empty response has no activations
        if acts_shape is None or empty:
            return acts is None
        return isinstance(acts, Tensor) and acts.shape == acts_shape

    def record_ok(r: Any, m: Mapping[str, Any]) -> bool:
        return (
            isinstance(r, dict)
            and isinstance(r.get("response_ids"), list)
            and (r.get("polarity"), r.get("index")) == (m["polarity"], m["index"])
            and acts_ok(r.get("acts"), not r["response_ids"])
        )

    def valid(idx: list[int], shard: Any) -> bool:
        return (
            isinstance(shard, list)
            and len(shard) == len(idx)
            and all(record_ok(r, meta[i]) for i, r in zip(idx, shard, strict=True))
        )

    return valid


def pool_records(
    model: Model,
    records: Sequence[Mapping[str, Any]],
    capture: Capture,
    size: int,
    shards: Shards,
    device: Any,
    desc: str,
) -> dict[Key, Tensor]:
    """Each record's residual averaged over its response tokens, keyed by (polarity, index):
    what was recorded while generating (combined mode: each record's ``acts``), or a
    teacher-forced pass over prompt + response (two-stage). Records with an empty response
    have nothing to average and are left out."""
    rows = [r for r in records if r["n_response_tokens"] > 0]
    if capture.combined:
        return {(r["polarity"], r["index"]): r["acts"] for r in rows}

    def compute(chunk: list[int]) -> list:
        prompts = [rows[i]["prompt_ids"] for i in chunk]
        responses = [rows[i]["response_ids"] for i in chunk]
        return list(pooled_activations(model, prompts, responses, capture.layers, capture.hook))

    def valid(idx: list[int], shard: Any) -> bool:
        acts = shard.get("acts") if isinstance(shard, dict) else None
        shape = (len(idx), len(capture.layers), model.cfg.d_model)
        return isinstance(acts, Tensor) and shard["rows"] == idx and acts.shape == shape

    total = [len(r["prompt_ids"]) + r["n_response_tokens"] for r in rows]
    contents, _ = shards(total, size, compute,
                         lambda idx, acts: {"rows": idx, "acts": torch.stack(acts)},
                         device, desc, valid)  # fmt: skip
    return {
        (rows[i]["polarity"], rows[i]["index"]): acts
        for shard in contents
        for i, acts in zip(shard["rows"], shard["acts"], strict=True)
    }
