"""Which tokens spell the integers 0-100 in a vocabulary, the tree of their spellings, and the
exact probability of each integer from next-token distributions along that tree (digit by digit:
both embedded tokenizers split numbers into single digits)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

__all__ = ["NumberTree", "NumberVocab", "next_token_stats", "number_probs"]

N_VALUES = 101
VALID_NUMBERS = frozenset(str(n) for n in range(N_VALUES))
_PREFIXES = frozenset(s[:i] for s in VALID_NUMBERS for i in range(1, len(s) + 1))
_DIGITS_RE = re.compile(r"[0-9]+")
_BYTE_PIECE_RE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


# --------------------------------------------------------------------------------------------
# Which tokens spell numbers
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NumberVocab:
    """The tokens that matter for reading numbers, by their decoded text.

    ``digits``: id -> text for tokens that are ASCII digits only. ``spaced``: id -> digits for
    tokens that are one space then digits. ``spaces``: tokens that are exactly one space.
    ``digit_start``: every token whose text starts with an ASCII digit (the number goes on).
    """

    digits: dict[int, str]
    spaced: dict[int, str]
    spaces: tuple[int, ...]
    digit_start: tuple[int, ...]

    @classmethod
    def from_texts(
        cls, texts: dict[int, str], byte_fallback: frozenset[int] = frozenset()
    ) -> NumberVocab:
        """Classify tokens given as id -> decoded text (only number-like tokens are needed).

        ``byte_fallback`` tokens (SentencePiece ``<0x34>``-style pieces) are left out of the
        spellings when another token has the same text: the tokenizer never produces them there,
        so models give them almost no probability, and counting them would multiply the tree.
        They still count as "the number goes on" for the end probability, so their (tiny) mass
        is lost rather than given to a wrong number.
        """
        regular = {t for i, t in texts.items() if i not in byte_fallback}
        digits: dict[int, str] = {}
        spaced: dict[int, str] = {}
        spaces: list[int] = []
        digit_start: list[int] = []
        for token_id, text in sorted(texts.items()):
            if text[:1].isascii() and text[:1].isdigit():
                digit_start.append(token_id)
            if token_id in byte_fallback and text in regular:
                continue
            if _DIGITS_RE.fullmatch(text):
                digits[token_id] = text
            elif text.startswith(" ") and _DIGITS_RE.fullmatch(text[1:]):
                spaced[token_id] = text[1:]
            elif text == " ":
                spaces.append(token_id)
        return cls(digits, spaced, tuple(spaces), tuple(digit_start))

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> NumberVocab:
        """Classify a Hugging Face tokenizer's vocabulary.

        Candidates are pieces containing an ASCII digit (this includes byte-fallback pieces like
        ``<0x34>``) and one-character pieces (``"Ġ"``, ``"▁"``); each is decoded after an anchor
        token so that decoders which strip a leading space at the start of a text (SentencePiece)
        still show it.
        """
        vocab: dict[str, int] = tokenizer.get_vocab()
        anchor = tokenizer.encode("a", add_special_tokens=False)
        if len(anchor) != 1:
            anchor = []
        base = tokenizer.decode(anchor, clean_up_tokenization_spaces=False) if anchor else ""
        texts: dict[int, str] = {}
        byte_fallback: set[int] = set()
        for piece, token_id in vocab.items():
            if not (len(piece) == 1 or any(c in "0123456789" for c in piece)):
                continue
            if _BYTE_PIECE_RE.fullmatch(piece):
                byte_fallback.add(token_id)
            full = tokenizer.decode(anchor + [token_id], clean_up_tokenization_spaces=False)
            if anchor and full.startswith(base):
                texts[token_id] = full[len(base) :]
            else:
                texts[token_id] = tokenizer.decode([token_id], clean_up_tokenization_spaces=False)
        return cls.from_texts(texts, frozenset(byte_fallback))


@dataclass(frozen=True)
class NumberTree:
    """Every token sequence that spells (a prefix of) an integer 0-100, as a tree.

    Node 0 is the root (the prompt). For node ``i > 0``: ``parent[i]`` (always a smaller index),
    ``token[i]`` (the token on the edge from the parent), ``depth[i]``, ``value[i]`` (the integer
    its text spells, or None for a lone-space node) and ``column[i]`` (the index of ``token[i]``
    in ``tracked``, the ids whose probabilities are read).
    """

    parent: tuple[int, ...]
    token: tuple[int, ...]
    depth: tuple[int, ...]
    value: tuple[int | None, ...]
    column: tuple[int, ...]
    tracked: tuple[int, ...]
    digit_start: tuple[int, ...]

    @classmethod
    def build(cls, vocab: NumberVocab) -> NumberTree:
        parent, token, depth, text = [-1], [-1], [0], [""]
        value: list[int | None] = [None]
        first = list(vocab.digits.items()) + list(vocab.spaced.items())
        queue: list[tuple[int, bool]] = [(0, True)]  # (node, is the next token the first one)
        while queue:
            node, at_start = queue.pop(0)
            options = first if at_start else list(vocab.digits.items())
            for token_id, digits in options:
                spelled = text[node] + digits
                if spelled in _PREFIXES:
                    parent.append(node)
                    token.append(token_id)
                    depth.append(depth[node] + 1)
                    value.append(int(spelled) if spelled in VALID_NUMBERS else None)
                    text.append(spelled)
                    queue.append((len(parent) - 1, False))
            if at_start:
                for token_id in vocab.spaces:
                    parent.append(node)
                    token.append(token_id)
                    depth.append(1)
                    value.append(None)
                    text.append("")
                    queue.append((len(parent) - 1, False))
        tracked = tuple(sorted(set(token[1:])))
        where = {t: i for i, t in enumerate(tracked)}
        column = tuple([-1] + [where[t] for t in token[1:]])
        return cls(
            tuple(parent), tuple(token), tuple(depth), tuple(value), column, tracked,
            vocab.digit_start,
        )  # fmt: skip

    @property
    def n_nodes(self) -> int:
        return len(self.parent)

    @property
    def max_depth(self) -> int:
        return max(self.depth)

    def path(self, node: int) -> tuple[int, ...]:
        """The token ids from the root to ``node``."""
        tokens: list[int] = []
        while node > 0:
            tokens.append(self.token[node])
            node = self.parent[node]
        return tuple(reversed(tokens))

    def ancestor_or_self(self) -> list[list[bool]]:
        """``m[i][j]`` is True when node ``j`` is node ``i`` or one of its ancestors."""
        m = [[False] * self.n_nodes for _ in range(self.n_nodes)]
        for i in range(self.n_nodes):
            j = i
            while j >= 0:
                m[i][j] = True
                j = self.parent[j]
        return m

    def nodes_at(self, depth: int) -> list[int]:
        return [i for i, d in enumerate(self.depth) if d == depth and i > 0]

    def spellings(self, number: int) -> list[tuple[int, ...]]:
        """Every token sequence this tree counts for ``number``."""
        return [self.path(i) for i, v in enumerate(self.value) if v == number and i > 0]


def next_token_stats(
    tree: NumberTree, logits: Float[Tensor, "row vocab"]
) -> tuple[Float[Tensor, "row tracked"], Float[Tensor, " row"]]:
    """From next-token logits (or log-probabilities), in float64: the probabilities of the tree's
    tracked tokens and the probability that a number stops here (the next token's text does not
    start with a digit)."""
    logits64 = logits.to(torch.float64)
    log_z = torch.logsumexp(logits64, dim=-1, keepdim=True)
    tracked_ids = torch.tensor(tree.tracked, dtype=torch.long, device=logits.device)
    tracked = torch.exp(logits64.index_select(-1, tracked_ids) - log_z)
    if tree.digit_start:
        ds_ids = torch.tensor(tree.digit_start, dtype=torch.long, device=logits.device)
        digit_mass = torch.exp(logits64.index_select(-1, ds_ids) - log_z).sum(dim=-1)
        end = (1.0 - digit_mass).clamp(min=0.0)
    else:
        end = torch.ones(logits.shape[0], dtype=torch.float64, device=logits.device)
    return tracked, end


def number_probs(
    tree: NumberTree,
    tracked: Float[Tensor, "batch node tracked"],
    end: Float[Tensor, "batch node"],
) -> Float[Tensor, "batch 101"]:
    """P(integer) for 0..100 from each node's next-token statistics.

    ``tracked[b, i]`` / ``end[b, i]`` are :func:`next_token_stats` of the distribution after node
    ``i``'s path for prompt ``b``. The probability of a path is the product of its edges'
    probabilities; an integer's probability is the sum over its spellings of path probability
    times the end probability after it.
    """
    batch = tracked.shape[0]
    path_p = torch.zeros((batch, tree.n_nodes), dtype=torch.float64, device=tracked.device)
    path_p[:, 0] = 1.0
    for depth in range(1, tree.max_depth + 1):
        nodes = tree.nodes_at(depth)
        idx = torch.tensor(nodes, dtype=torch.long, device=tracked.device)
        parents = torch.tensor([tree.parent[i] for i in nodes], device=tracked.device)
        columns = torch.tensor([tree.column[i] for i in nodes], device=tracked.device)
        edge_p = tracked[:, parents, columns].to(torch.float64)
        path_p[:, idx] = path_p[:, parents] * edge_p
    valued = [i for i, v in enumerate(tree.value) if v is not None and i > 0]
    idx = torch.tensor(valued, dtype=torch.long, device=tracked.device)
    values = torch.tensor([tree.value[i] for i in valued], dtype=torch.long, device=tracked.device)
    out = torch.zeros((batch, N_VALUES), dtype=torch.float64, device=tracked.device)
    out.index_add_(1, values, path_p[:, idx] * end[:, idx].to(torch.float64))
    return out
