"""Judge-free fluency of a (steered) model: how far its next-token distribution moves from the
unsteered model's on neutral text (KL divergence), measured teacher-forced, so it is exact and
cheap (one forward pass) and needs no sampling.

The neutral texts (:data:`tlextract.ops.neutral.NEUTRAL_TEXTS`) are fed as the *answers* to
neutral user messages under the experiment's prompt style, and the distributions compared are
those that predict the answer tokens: the positions where a steered model writes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from tlextract.model.decoding import Model, teacher_forced
from tlextract.model.tokens import device_of, text_ids, tokenizer_of, user_prompts
from tlextract.ops.neutral import NEUTRAL_QUESTIONS, NEUTRAL_TEXTS
from tlextract.ops.pool import pack


def neutral_answers(
    model: Model, style: str, texts: Sequence[str] = NEUTRAL_TEXTS
) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt ids, answer ids): each text as the answer to a neutral question, in turn,
    rendered as the pipeline renders prompts."""
    questions = [NEUTRAL_QUESTIONS[i % len(NEUTRAL_QUESTIONS)] for i in range(len(texts))]
    prompts = user_prompts(model, questions, style)
    # After "A:" a completion model writes a space first.
    texts = [f" {t}" if style == "completion" else t for t in texts]
    return prompts, text_ids(model, texts)


@torch.inference_mode()
def answer_logprobs(
    model: Model,
    prompt_ids: Sequence[Sequence[int]],
    answer_ids: Sequence[Sequence[int]],
) -> Float[Tensor, "n_answer_tokens vocab"]:
    """Log-probabilities of the next token at every position that predicts an answer token
    (under whatever hooks are active), in float32 on the CPU."""
    logits, _, answer = _read_answers(model, prompt_ids, answer_ids)
    # Position p predicts token p + 1: keep the positions whose next token is an answer token.
    return logits[:, :-1][answer[:, 1:]].float().log_softmax(-1).cpu()


def mean_logprobs(
    logits: Float[Tensor, "batch pos vocab"],
    tokens: Int[Tensor, "batch pos"],
    answer: Bool[Tensor, "batch pos"],
) -> list[float | None]:
    """Each row's mean log-probability per answer token (None for a row with no answer)."""
    logp = logits[:, :-1].float().log_softmax(-1).gather(-1, tokens[:, 1:, None])[..., 0]
    target = answer[:, 1:].float()
    sums, counts = (logp * target).sum(1).tolist(), target.sum(1).tolist()
    return [s / c if c else None for s, c in zip(sums, counts, strict=True)]


@torch.inference_mode()
def answer_logprob(
    model: Model,
    prompt_ids: Sequence[Sequence[int]],
    answer_ids: Sequence[Sequence[int]],
) -> list[float | None]:
    """Mean log-probability per token of each answer under the model as it is (no hooks
    expected): how natural the unsteered model finds a steered model's text."""
    return mean_logprobs(*_read_answers(model, prompt_ids, answer_ids))


def _read_answers(
    model: Model,
    prompt_ids: Sequence[Sequence[int]],
    answer_ids: Sequence[Sequence[int]],
) -> tuple[Float[Tensor, "batch pos vocab"], Int[Tensor, "batch pos"], Bool[Tensor, "batch pos"]]:
    """One teacher-forced pass over each prompt followed by its answer: logits, tokens, and
    which positions hold answer tokens."""
    tokens, attn, answer = pack(
        prompt_ids, answer_ids, tokenizer_of(model).pad_token_id, device_of(model)
    )
    logits, _ = teacher_forced(model, tokens, attn, logits=True)
    assert logits is not None
    return logits, tokens, answer


def kl_divergence(
    steered: Float[Tensor, "n vocab"], base: Float[Tensor, "n vocab"]
) -> Float[Tensor, " n"]:
    """KL(steered || base) per position, in nats: what steering costs the model's prediction."""
    return (steered.exp() * (steered - base)).sum(-1).clamp(min=0)
