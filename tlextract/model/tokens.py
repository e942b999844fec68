"""Tokenizer, device and padding helpers shared by everything that feeds a model."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Int
from torch import Tensor
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from tlextract.errors import TLExtractError
from tlextract.model.decoding import Model
from tlextract.traits import render_prompt

# End-of-turn markers of chat templates; generation stops at these as well as at eos.
END_OF_TURN = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>")


def tokenizer_of(model: Model | PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """The model's tokenizer (a tokenizer is its own: engines other than TransformerLens
    prepare prompts without loading the TransformerLens model)."""
    if isinstance(model, PreTrainedTokenizerBase):
        return model
    if model.tokenizer is None:
        raise TLExtractError(
            f"model {model.cfg.model_name!r} has no tokenizer; load it with tlextract.load_model"
        )
    return model.tokenizer


def device_of(model: Model) -> str | torch.device:
    return model.cfg.device or "cpu"


def stop_token_ids(model: Model | PreTrainedTokenizerBase) -> list[int]:
    tok = tokenizer_of(model)
    ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    for marker in END_OF_TURN:  # one lookup each: get_vocab() builds a 49k-entry dict (20 ms)
        i = tok.convert_tokens_to_ids(marker)
        if isinstance(i, int) and tok.convert_ids_to_tokens(i) == marker:
            ids.add(i)
    return sorted(ids)


def tokenize(
    model: Model | PreTrainedTokenizerBase, texts: Sequence[str], style: str
) -> list[list[int]]:
    """Chat-template text already holds its special tokens; completion text gets the tokenizer's
    own (e.g. BOS)."""
    enc = tokenizer_of(model)(list(texts), add_special_tokens=(style == "completion"))
    return [list(ids) for ids in enc["input_ids"]]


def text_ids(model: Model, texts: Sequence[str]) -> list[list[int]]:
    """Plain text (an answer, a reference sentence) as token ids, no special tokens added."""
    enc = tokenizer_of(model)(list(texts), add_special_tokens=False)
    return [list(ids) for ids in enc["input_ids"]]


def user_prompts(model: Model, texts: Sequence[str], style: str) -> list[list[int]]:
    """Each text as a user message with no instruction, rendered in ``style`` and tokenized as
    the pipeline's prompts are."""
    tok = tokenizer_of(model)
    return tokenize(model, [render_prompt(tok, style, "", t) for t in texts], style)


def left_pad(
    seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device | str
) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
    """Tokens padded on the left, and the attention mask (1 = real token)."""
    width = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            tokens[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s) :] = 1
    return tokens.to(device), mask.to(device)


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> None:
    """Left padding (generation appends on the right); pad and BOS default to eos where missing,
    as TransformerLens' set_tokenizer does (model_info records pad_is_eos)."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.bos_token is None:
        tokenizer.bos_token = tokenizer.eos_token
