"""Every answer token's residual at several hook points, from one teacher-forced pass per batch.

Token ``i`` gets the residual *at* token ``i``, as :func:`tlextract.ops.monitor.monitor` scores
it while generating (equal to ``run_with_cache`` on the final text, tested there), so a threshold
set on these scores applies to the monitor's. Only answer tokens are kept: the prompt (chat
template included) is not what an alarm watches.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from tlextract.model.decoding import Model, teacher_forced
from tlextract.model.tokens import device_of, tokenizer_of
from tlextract.ops.pool import pack


@torch.inference_mode()
def answer_residuals(
    model: Model,
    prompt_ids: Sequence[Sequence[int]],
    answer_ids: Sequence[Sequence[int]],
    hook_names: Sequence[str],
    batch_size: int = 8,
) -> list[Float[Tensor, "_token hook d_model"]]:
    """Per answer, its tokens' residuals at each of ``hook_names`` (in that order), float32 on
    the CPU. An empty answer gives a ``[0, hooks, d_model]`` tensor."""
    names = list(hook_names)
    pad = tokenizer_of(model).pad_token_id
    out: list[Tensor] = []
    for start in range(0, len(prompt_ids), batch_size):
        chunk = slice(start, start + batch_size)
        tokens, attn, answer = pack(prompt_ids[chunk], answer_ids[chunk], pad, device_of(model))
        _, acts = teacher_forced(model, tokens, attn, names)
        stacked = torch.stack([acts[n].float() for n in names], dim=2).cpu()  # batch pos hook d
        out += [row[mask] for row, mask in zip(stacked, answer.cpu(), strict=True)]
    return out
