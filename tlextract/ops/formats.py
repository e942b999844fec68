"""Export and import vectors in the formats other tools read.

The readers themselves are in vector_files.py, which ``TraitVectors.load`` uses to open any of
these files by content; this module wraps them and holds the writers.

Index conventions (``layers[i]`` is always a TransformerLens block index, 0-based, and the
vectors are read at ``blocks.{layer}.hook_{hook}``):

**persona_vectors ``.pt``** (safety-research/persona_vectors): one float32 tensor
[n_layers + 1, d_model] indexed like transformers' ``output_hidden_states``: row 0 is the
embedding output, row ``l + 1`` is the output of block ``l``. So::

    blocks.{l}.hook_resid_post  ->  row l + 1      (the usual case)
    blocks.{l}.hook_resid_pre   ->  row l          (the input of block l = output of block l-1)

Rows we have no vector for (row 0 when extracting at resid_post, blocks not extracted) are
zeros. persona_vectors steers with ``vector[row]`` at ``model.layers[row - 1]``'s output, which
is the same place.

**GGUF control vectors** (llama.cpp ``--control-vector``, repeng ``export_gguf``): tensors
``direction.{i}``, float32 [d_model], with ``general.architecture = "controlvector"``,
``controlvector.model_hint`` and ``controlvector.layer_count`` (the number of direction tensors,
as repeng writes it). llama.cpp adds ``direction.{i}`` to the output of its layer ``il = i``
(0-based, after the block's last residual add, ``l_out``) and rejects ``i = 0``; repeng's
``directions[i]`` is likewise the output of ``model.layers[i]`` (``hidden_states[i + 1]``).
So::

    blocks.{l}.hook_resid_post  ->  direction.{l}      (block 0 cannot be exported)
    blocks.{l}.hook_resid_pre   ->  direction.{l - 1}  (blocks 0 and 1 cannot be exported)

``resid_mid`` has no equivalent in either format.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import gguf
import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from tlextract.errors import TLExtractError
from tlextract.ops.vector_files import (
    GGUF_ARCH,
    check_layers,
    gguf_layer_index,
    hidden_state_index,
    persona_fields,
    read_gguf,
    read_persona,
)
from tlextract.ops.vectors import TraitVectors
from tlextract.store import atomic_path, save_tensors

# ---------------------------------------------------------------------------------------------
# persona_vectors


def to_persona_vectors(
    vectors: Float[Tensor, "layer d_model"],
    layers: Sequence[int],
    n_layers: int,
    *,
    hook: str = "resid_post",
) -> Float[Tensor, "hidden_state d_model"]:
    """The persona_vectors tensor [n_layers + 1, d_model] (float32, CPU) holding ``vectors[i]``
    at row ``hidden_state_index(layers[i], hook)`` and zeros elsewhere."""
    block = check_layers(layers, vectors.shape[0], "to_persona_vectors")
    bad = [b for b in block if not 0 <= b < n_layers]
    if bad:
        raise TLExtractError(
            f"to_persona_vectors: layers {bad} are not blocks of a {n_layers}-block model."
        )
    out = torch.zeros(n_layers + 1, vectors.shape[1], dtype=torch.float32)
    rows = torch.tensor([hidden_state_index(b, hook) for b in block], dtype=torch.long)
    out[rows] = vectors.detach().float().cpu()
    return out


def from_persona_vectors(
    table: Float[Tensor, "hidden_state d_model"],
    layers: Sequence[int] | None = None,
    *,
    hook: str = "resid_post",
) -> TraitVectors:
    """Inverse of :func:`to_persona_vectors`: the rows for ``layers`` (default: every block,
    ``0..n_layers-1``, which drops the embedding row 0 at resid_post), as float32."""
    return TraitVectors(**persona_fields(table, layers, hook=hook))


def save_persona_vectors(
    path: Path,
    vectors: Float[Tensor, "layer d_model"],
    layers: Sequence[int],
    n_layers: int,
    *,
    hook: str = "resid_post",
) -> None:
    """Write the persona_vectors ``.pt`` file (a bare tensor, as ``torch.save`` writes it)."""
    save_tensors(Path(path), to_persona_vectors(vectors, layers, n_layers, hook=hook))


def load_persona_vectors(
    path: Path, layers: Sequence[int] | None = None, *, hook: str = "resid_post"
) -> TraitVectors:
    """Read a persona_vectors ``.pt`` file; see :func:`from_persona_vectors`."""
    return TraitVectors(**read_persona(Path(path), layers, hook=hook))


# ---------------------------------------------------------------------------------------------
# GGUF control vectors


def save_gguf(
    path: Path,
    vectors: Float[Tensor, "layer d_model"],
    layers: Sequence[int],
    model_hint: str,
    *,
    hook: str = "resid_post",
    skip_unsupported: bool = False,
) -> list[int]:
    """Write a llama.cpp / repeng control vector; returns the block indices written.

    ``model_hint`` is the model family llama.cpp and repeng show to the user (repeng writes
    transformers' ``config.model_type``, e.g. ``"llama"``). Blocks with no llama.cpp layer (see
    :func:`gguf_layer_index`) raise, or are left out with ``skip_unsupported=True``.
    Vectors are written as float32, in the order given.
    """
    block = check_layers(layers, vectors.shape[0], "save_gguf")
    index = [gguf_layer_index(b, hook) for b in block]
    unsupported = [b for b, i in zip(block, index, strict=True) if i < 1]
    if unsupported and not skip_unsupported:
        raise TLExtractError(
            f"save_gguf: blocks {unsupported} at hook_{hook} have no llama.cpp control-vector "
            "layer (llama.cpp cannot steer before block 1's output); drop them or pass "
            "skip_unsupported=True."
        )
    data = vectors.detach().float().cpu().numpy()
    path = Path(path)
    written: list[int] = []
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(tmp, GGUF_ARCH)
        writer.add_string(f"{GGUF_ARCH}.model_hint", model_hint)
        writer.add_uint32(f"{GGUF_ARCH}.layer_count", len(block) - len(unsupported))
        for row, (b, i) in enumerate(zip(block, index, strict=True)):
            if i < 1:
                continue
            writer.add_tensor(f"direction.{i}", np.ascontiguousarray(data[row], dtype=np.float32))
            written.append(b)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return written


def load_gguf(path: Path, *, hook: str = "resid_post") -> TraitVectors:
    """Read a GGUF control vector (ours, repeng's or llama.cpp's ``cvector-generator``).

    Rows come back sorted by block; ``direction.{i}`` becomes block ``i`` at resid_post
    (``i + 1`` at resid_pre). Values are returned exactly as stored (float32).
    """
    return TraitVectors(**read_gguf(Path(path), hook=hook))
