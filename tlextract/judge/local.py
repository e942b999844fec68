"""A judge that runs a HookedTransformer and reads the exact probability of every integer 0-100.

API judges see "42" as one token; the embedded tokenizers spell numbers digit by digit ("42" is two
tokens), so the probability of an integer is a product of next-token probabilities along its
spelling, times the probability that the number stops there::

    P(42) = P("4" | prompt) * P("2" | prompt "4") * P(end | prompt "42")

where *end* means the next token does not start with a digit (1 - P(any token whose text starts with
an ASCII digit)). All spellings of a number are summed: for each judged prompt this module builds a
token tree of every spelling of every integer 0-100 (:class:`NumberTree`, about 200 nodes for
single-digit vocabularies) and needs the next-token distribution after every node.

It gets them all in ONE forward pass per batch of prompts ("tree attention"): each row is
[left padding, prompt, every tree token in node order]; hooks give each tree token its true position
(rotary: queries/keys rotated back; absolute: position embedding replaced) and let it attend only
to the prompt and its own ancestors, so the logits at a tree token are exactly those of the model
run on prompt + that node's spelling. The cost is about that of a forward over prompt + 200 tokens.
Where that is not exact (ALiBi, dynamic NTK, a sliding window or the context shorter than prompt +
tree), it falls back to one pass per tree depth in which every node extends the prompt's frozen
KV cache (exact for any architecture, tens of times slower). Tests check both against running the
model on each full sequence. Probabilities are computed in float64 from the logits.

Spellings (decided from the token *texts*, so they hold for byte-level BPE and SentencePiece alike):

* the first token is digits (``"4"``, ``"42"`` where the vocabulary has multi-digit tokens) or one
  space then digits (``" 4"``); a token that is a lone space followed by digit tokens is the same
  spelling split in two (byte-level vocabularies with individual digits produce ``" "`` ``"4"``
  after ``"Answer:"``). Chat templates end the assistant prefix with a newline, where models write
  ``"4"``; completion prompts ending in ``":"`` get ``" 4"`` / ``" "`` ``"4"``. All are counted.
* later tokens are digits only (a space inside a number ends it: ``"4 2"`` is 4).
* byte-fallback pieces (``<0x34>``) that duplicate a regular token are not spellings (tokenizers
  never produce them there; counting them would multiply the tree), but they still count as "the
  number goes on", so their tiny mass is lost, never given to a wrong number.
* only canonical numbers count: ``"0"`` to ``"100"`` without leading zeros, so ``"05"`` and
  ``"007"`` are not 5 or 7, and ``"0"`` followed by a digit is not 0 (its mass is lost, as is the
  mass of ``"101"`` or of ``"4."``-style tokens that start with a digit and go on with other text).

The per-number probabilities therefore sum to at most 1;
:func:`tlextract.judge.base.aggregate_score` turns them into the score (None when they sum to
less than ``min_mass``).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

from tlextract.errors import TLExtractError
from tlextract.judge.base import DEFAULT_MIN_MASS, Score, aggregate_score
from tlextract.judge.numbers import (
    N_VALUES,
    NumberTree,
    NumberVocab,
    next_token_stats,
    number_probs,
)
from tlextract.model.decoding import Model
from tlextract.model.tokens import device_of, left_pad
from tlextract.ops.generate import final_logits

__all__ = ["LocalJudge"]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# The judge
# --------------------------------------------------------------------------------------------


def _fingerprint(model: HookedTransformer) -> str:
    """A short hash of the config and a strided sample of every parameter: two different models
    with the same ``model_name`` (e.g. "custom") get different judge names and cache keys."""
    h = hashlib.sha256()
    cfg = model.cfg
    h.update(repr((cfg.model_name, cfg.n_layers, cfg.d_model, cfg.d_vocab, cfg.n_ctx)).encode())
    with torch.no_grad():
        for name, param in model.named_parameters():
            flat = param.detach().reshape(-1)
            step = max(1, flat.numel() // 2048)
            h.update(name.encode())
            h.update(flat[::step].to(device="cpu", dtype=torch.float32).numpy().tobytes())
    return h.hexdigest()[:12]


class LocalJudge:
    """Judge with a HookedTransformer: exact probabilities of 0..100 from its next-token logits.

    Args:
        model: the judge model (its tokenizer must be set).
        batch_size: prompts per forward pass.
        min_mass: see :func:`tlextract.judge.base.aggregate_score`.
        chat: wrap each judge prompt in the tokenizer's chat template (a user turn, then the
            assistant prefix) when it has one; otherwise, or with ``chat=False``, the prompt is
            used as-is, tokenized with the tokenizer's own special tokens (e.g. BOS), so end it
            with something like ``"...\\nAnswer:"``.
        packed: how the tree of number spellings is evaluated. True: one forward pass per batch
            over prompt + every tree token, with hooks that give each tree token its true position
            and let it attend only to the prompt and its own ancestors ("tree attention"). False:
            one pass per tree depth in which every node extends the cached prompt (exact for any
            architecture, but each node re-reads the whole prompt cache: tens of times slower).
            None (default): packed whenever it is exact for the model and batch (rotary, standard
            or shortformer positions, no dynamic NTK / log-n scaling, sequences within the
            context and any sliding window), else per depth.
    """

    def __init__(
        self,
        model: Model,
        batch_size: int = 8,
        min_mass: float = DEFAULT_MIN_MASS,
        chat: bool = True,
        packed: bool | None = None,
    ) -> None:
        if not isinstance(model, HookedTransformer):
            # Its packed scoring pass drives TransformerLens' own KV cache entries.
            raise TLExtractError(
                f"the local judge runs on a HookedTransformer, and {model.cfg.model_name} loaded "
                "as a TransformerBridge: judge with an embedded or TransformerLens model, or an "
                "OpenAI-compatible server"
            )
        if model.tokenizer is None:
            raise TLExtractError("the local judge model has no tokenizer")
        if batch_size < 1:
            raise TLExtractError("the local judge's batch_size must be >= 1")
        self.model = model
        self.tokenizer = model.tokenizer
        self.batch_size = batch_size
        self.min_mass = float(min_mass)
        self.packed = packed
        self.chat = bool(chat and getattr(self.tokenizer, "chat_template", None))
        self.vocab = NumberVocab.from_tokenizer(self.tokenizer)
        self.tree = NumberTree.build(self.vocab)
        if not any(v is not None for v in self.tree.value):
            raise TLExtractError(
                f"the local judge model {model.cfg.model_name!r} has no tokens for the digits "
                "0-9, so it cannot write a 0-100 score"
            )
        style = "chat" if self.chat else "plain"
        self.name = (
            f"local:{model.cfg.model_name}#{_fingerprint(model)}:{style}:min_mass={min_mass:g}"
        )
        self._packing_problem = _packing_problem(model)
        if packed and self._packing_problem:
            raise TLExtractError(
                f"packed=True is not exact for this model: {self._packing_problem}"
            )

    def __repr__(self) -> str:
        return f"LocalJudge({self.name!r}, batch_size={self.batch_size})"

    def format_prompt(self, prompt: str) -> str:
        """The text the model reads: the chat-formatted user turn, or the prompt itself."""
        if not self.chat:
            return prompt
        messages = [{"role": "user", "content": prompt}]
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        return str(text)

    def tokenize(self, prompts: Sequence[str]) -> list[list[int]]:
        """Token ids per prompt (chat text already holds its special tokens)."""
        texts = [self.format_prompt(p) for p in prompts]
        enc = self.tokenizer(texts, add_special_tokens=not self.chat)
        return [list(ids) for ids in enc["input_ids"]]

    def score(self, prompts: list[str]) -> list[Score]:
        probs = self.number_probs(prompts)
        scores = []
        for row in probs.tolist():
            if any(p != p for p in row):  # NaN: the prompt did not fit in the context
                scores.append(Score(None))
            else:
                scores.append(Score(aggregate_score(dict(enumerate(row)), self.min_mass)))
        return scores

    @torch.inference_mode()
    def number_probs(self, prompts: Sequence[str]) -> Float[Tensor, "prompt 101"]:
        """P(n) for n = 0..100 per prompt (float64, CPU). A row of NaN marks a prompt too long for
        the model's context (its judgment is missing)."""
        ids = self.tokenize(prompts)
        out = torch.full((len(ids), N_VALUES), float("nan"), dtype=torch.float64)
        limit = self.model.cfg.n_ctx - self.tree.max_depth
        fits = [i for i, s in enumerate(ids) if 0 < len(s) <= limit]
        for i in sorted(set(range(len(ids))) - set(fits)):
            log.warning(
                "judge prompt %d has %d tokens; the judge model takes at most %d: scored missing",
                i,
                len(ids[i]),
                limit,
            )
        # Similar lengths together: less padding.
        fits.sort(key=lambda i: len(ids[i]))
        for start in range(0, len(fits), self.batch_size):
            chunk = fits[start : start + self.batch_size]
            seqs = [ids[i] for i in chunk]
            if self._use_packed(max(len(s) for s in seqs)):
                probs = self._packed_number_probs(seqs)
            else:
                probs = self._per_depth_number_probs(seqs)
            out[chunk] = probs.cpu()
        return out

    # ---------------------------------------------------------------------------------------

    def _use_packed(self, width: int) -> bool:
        if self.packed is False or self._packing_problem:
            return False
        cfg = self.model.cfg
        total = width + self.tree.n_nodes - 1
        problem = ""
        if total > cfg.n_ctx:
            problem = f"prompt + tree ({total} tokens) exceeds n_ctx {cfg.n_ctx}"
        elif _has_local_attention(self.model) and total > (cfg.window_size or 0):
            problem = f"prompt + tree ({total} tokens) exceeds the sliding window {cfg.window_size}"
        if problem and self.packed:
            raise TLExtractError(f"packed=True is not exact for this batch: {problem}")
        if problem:
            log.info("local judge: per-depth passes for this batch (%s)", problem)
        return not problem

    def _stats(
        self, resid: Float[Tensor, "row d_model"]
    ) -> tuple[Float[Tensor, "row tracked"], Float[Tensor, " row"]]:
        """Next-token statistics from final residuals, unembedding a bounded number of rows at a
        time (only the positions that are needed, never the whole prompt)."""
        model = self.model
        step = max(1, 2**25 // model.cfg.d_vocab)
        tracked, end = [], []
        for lo in range(0, resid.shape[0], step):
            logits = final_logits(model, resid[lo : lo + step, None, :])[:, 0, :]
            t, e = next_token_stats(self.tree, logits)
            tracked.append(t.cpu())
            end.append(e.cpu())
        return torch.cat(tracked), torch.cat(end)

    def _packed_number_probs(self, seqs: list[list[int]]) -> Float[Tensor, "batch 101"]:
        """One forward pass: [left padding, prompt, tree tokens in node order] per row."""
        model, tree = self.model, self.tree
        device = model.cfg.device
        n_tree = tree.n_nodes - 1
        pad_id = self.tokenizer.pad_token_id
        prompt_tokens, prompt_mask = left_pad(seqs, 0 if pad_id is None else int(pad_id), "cpu")
        batch, width = prompt_tokens.shape
        tree_tokens = torch.tensor(tree.token[1:], dtype=torch.long).expand(batch, n_tree)
        tokens = torch.cat([prompt_tokens, tree_tokens], dim=1).to(device)
        mask = torch.cat([prompt_mask, torch.ones_like(tree_tokens)], dim=1).to(device)
        lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long, device=device)
        with model.hooks(fwd_hooks=self._tree_hooks(width, lengths)):
            resid = model(tokens, attention_mask=mask, stop_at_layer=model.cfg.n_layers)
        # Position width - 1 (the prompt's last token) is node 0; width + j is node j + 1.
        rows = resid[:, width - 1 :, :]
        tracked, end = self._stats(rows.reshape(-1, rows.shape[-1]))
        return number_probs(
            tree, tracked.view(batch, tree.n_nodes, -1), end.view(batch, tree.n_nodes)
        )

    def _tree_hooks(
        self, width: int, lengths: Int[Tensor, " batch"]
    ) -> list[tuple[str | Callable[..., Any], Callable[..., Any]]]:
        """Hooks that turn the packed tree tokens into independent continuations of the prompt.

        TransformerLens numbers tree token j (node j + 1, depth d) as position L + j; its true
        position is L + d - 1. Rotary models: queries and keys of tree tokens are rotated back by
        j - d + 1 (rotations compose). Absolute positions: the position embedding of tree tokens
        is replaced. Every model: a tree token attends to the prompt and to its ancestors only.
        """
        model, tree = self.model, self.tree
        device = model.cfg.device
        depth = torch.tensor(tree.depth[1:], dtype=torch.long, device=device)
        shift = torch.arange(len(depth), device=device) - (depth - 1)
        allowed = torch.ones((width + len(depth),) * 2, dtype=torch.bool, device=device)
        allowed[width:, width:] = torch.tensor(tree.ancestor_or_self(), device=device)[1:, 1:]
        hooks: list[tuple[str | Callable[..., Any], Callable[..., Any]]] = []

        def mask_scores(scores: Tensor, hook: Any) -> Tensor:
            return scores.masked_fill(~allowed, float("-inf"))

        if model.cfg.positional_embedding_type == "rotary":
            for i, block in enumerate(model.blocks):
                fix = _unrotate_hook(block.attn, shift)
                hooks += [
                    (f"blocks.{i}.attn.hook_rot_q", fix),
                    (f"blocks.{i}.attn.hook_rot_k", fix),
                ]
        else:  # standard / shortformer: absolute position embeddings
            true_pos = lengths[:, None] + depth[None, :] - 1
            w_pos = model.pos_embed.W_pos

            def fix_pos(pos_embed: Tensor, hook: Any) -> Tensor:
                return torch.cat([pos_embed[:, :width], w_pos[true_pos]], dim=1)

            hooks.append(("hook_pos_embed", fix_pos))
        hooks += [
            (f"blocks.{i}.attn.hook_attn_scores", mask_scores) for i in range(len(model.blocks))
        ]
        return hooks

    def _per_depth_number_probs(self, seqs: list[list[int]]) -> Float[Tensor, "batch 101"]:
        """The prompts once (KV cache kept), then per tree depth and prompt one pass in which
        every node of that depth extends the prompt's frozen cache (expanded as a view)."""
        model, tree = self.model, self.tree
        device = device_of(model)
        pad_id = self.tokenizer.pad_token_id
        tokens, mask = left_pad(seqs, 0 if pad_id is None else int(pad_id), device)
        batch, width = tokens.shape
        cache = TransformerLensKeyValueCache.init_cache(model.cfg, device, batch)
        resid = model(
            tokens, attention_mask=mask, past_kv_cache=cache, stop_at_layer=model.cfg.n_layers
        )
        tracked = torch.zeros((batch, tree.n_nodes, len(tree.tracked)), dtype=torch.float64)
        end = torch.zeros((batch, tree.n_nodes), dtype=torch.float64)
        tracked[:, 0], end[:, 0] = self._stats(resid[:, -1, :])
        for depth in range(1, tree.max_depth + 1):
            nodes = tree.nodes_at(depth)
            paths = torch.tensor([tree.path(i) for i in nodes], dtype=torch.long, device=device)
            for b, seq in enumerate(seqs):
                length = len(seq)
                rows = max(1, 65536 // (length + depth))
                for lo in range(0, len(nodes), rows):
                    part = paths[lo : lo + rows]
                    frozen = _expand_cache(cache, b, width - length, part.shape[0])
                    resid = model(
                        part,
                        attention_mask=torch.ones_like(part),
                        past_kv_cache=frozen,
                        stop_at_layer=model.cfg.n_layers,
                    )
                    sel = nodes[lo : lo + rows]
                    tracked[b, sel], end[b, sel] = self._stats(resid[:, -1, :])
        return number_probs(tree, tracked, end)


def _has_local_attention(model: HookedTransformer) -> bool:
    return any(getattr(block.attn, "attn_type", "global") == "local" for block in model.blocks)


def _packing_problem(model: HookedTransformer) -> str:
    """Why packed tree evaluation would not be exact for ``model`` ("" when it is)."""
    cfg = model.cfg
    kind = cfg.positional_embedding_type
    if kind not in ("rotary", "standard", "shortformer"):
        return f"positional embedding type {kind!r}"
    if getattr(cfg, "use_dynamic_ntk_rope", False) or getattr(cfg, "use_logn_attn", False):
        return "dynamic NTK / log-n attention depend on the sequence length"
    if kind == "rotary":
        for block in model.blocks:
            cos, sin = block.attn.rotary_cos.float(), block.attn.rotary_sin.float()
            if (cos.square() + sin.square() - 1.0).abs().max().item() > 1e-3:
                return "rotary tables are scaled (not pure rotations)"
    return ""


def _unrotate_hook(attn: Any, shift: Int[Tensor, " tree"]) -> Callable[..., Any]:
    """A hook on ``hook_rot_q`` / ``hook_rot_k`` that rotates the last ``len(shift)`` positions
    back by ``shift`` positions: R(-s) R(p) = R(p - s)."""
    rotary_dim = attn.cfg.rotary_dim
    n = len(shift)

    def hook(x: Tensor, hook: Any) -> Tensor:
        head, tree = x[:, :-n], x[:, -n:]
        cos = attn.rotary_cos[shift][None, :, None, :]
        sin = attn.rotary_sin[shift][None, :, None, :]
        x_rot, x_pass = tree[..., :rotary_dim], tree[..., rotary_dim:]
        back = x_rot * cos - attn.rotate_every_two(x_rot) * sin
        return torch.cat([head, torch.cat([back, x_pass], dim=-1)], dim=1)

    return hook


def _expand_cache(
    cache: TransformerLensKeyValueCache, row: int, start: int, n: int
) -> TransformerLensKeyValueCache:
    """A frozen cache holding prompt ``row``'s keys/values from position ``start`` (its left
    padding dropped), repeated ``n`` times as a view: extensions attend to it without copying."""
    entries = [
        TransformerLensKeyValueCacheEntry(
            past_keys=e.past_keys[row : row + 1, start:].expand(n, -1, -1, -1),
            past_values=e.past_values[row : row + 1, start:].expand(n, -1, -1, -1),
            frozen=True,
        )
        for e in cache.entries
    ]
    length = cache.previous_attention_mask.shape[1] - start
    mask = torch.ones((n, length), dtype=torch.long, device=cache.previous_attention_mask.device)
    return TransformerLensKeyValueCache(entries=entries, previous_attention_mask=mask, frozen=True)
