"""The writers of the vector formats other tools read, and their index conventions.

``TraitVectors.save(path, format=...)`` calls these writers and ``TraitVectors.load`` opens every
format by content (the readers are in vector_files.py); the functions here take bare tensors,
for vectors that are not a ``TraitVectors``.

Index conventions (``layers[i]`` is always a TransformerLens block index, 0-based, and the
vectors are read at ``blocks.{layer}.hook_{hook}``):

**transformers' ``hidden_states``** (``output_hidden_states=True``) has ``n_layers + 1``
entries: ``hidden_states[0]`` is the embedding output (= ``blocks.0.hook_resid_pre``),
``hidden_states[l]`` for ``1 <= l < n_layers`` is block ``l - 1``'s output (=
``blocks.{l-1}.hook_resid_post`` = ``blocks.{l}.hook_resid_pre``), and the last entry,
``hidden_states[n_layers]``, is the **final norm's output** (the model's ``norm`` applied to the
last block's output, its weight included: TransformerLens' ``ln_final.hook_normalized`` times
``ln_final.w``, which has no hook name of its own), not the last block's output. The last
block's output is not among them. tests/test_layer_edges.py checks every entry on the embedded
model.

**persona_vectors ``.pt``** (safety-research/persona_vectors): one float32 tensor
[n_layers + 1, d_model] whose row ``r`` is computed from ``hidden_states[r]``. So::

    blocks.{l}.hook_resid_post  ->  row l + 1      for l < n_layers - 1
    blocks.{l}.hook_resid_pre   ->  row l          for every block (row 0: the embedding)
    row n_layers                ->  the final norm's output: no blocks.* hook

Import never reads the last row (by default every block whose row is exact comes back: at
resid_post all but the last block; asking for the last block raises). Export refuses the last
block at resid_post (its row would be read as a final-norm-output direction), or leaves that
row zero with ``skip_unsupported=True``. Other rows we have no vector for are zeros.
persona_vectors steers with ``vector[row]`` at ``model.layers[row - 1]``'s output, the same
place as ours for every exported row.

**GGUF control vectors** (llama.cpp ``--control-vector``, repeng ``export_gguf``): tensors
``direction.{i}``, float32 [d_model], with ``general.architecture = "controlvector"``,
``controlvector.model_hint`` and ``controlvector.layer_count`` (the number of direction tensors,
as repeng writes it). llama.cpp adds ``direction.{i}`` to the output of its layer ``il = i``
(0-based, after the block's last residual add, ``l_out``, before the final norm even for the
last layer) and rejects ``i = 0``; repeng's ``ControlModel`` likewise adds ``directions[i]`` to
the output of ``model.layers[i]``. So, for every block::

    blocks.{l}.hook_resid_post  ->  direction.{l}      (block 0 cannot be exported)
    blocks.{l}.hook_resid_pre   ->  direction.{l - 1}  (blocks 0 and 1 cannot be exported)

(repeng's trainer reads layer ``i`` from ``hidden_states[i + 1]``, so the direction it trains for
the last layer comes from the final norm's output though it is applied at the block's output;
a file cannot say so.)

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

from tlextract.config import DEFAULT_HOOK
from tlextract.errors import TLExtractError
from tlextract.ops.vector_files import (
    GGUF_ARCH,
    check_layers,
    final_norm_row,
    gguf_layer_index,
    hidden_state_index,
)
from tlextract.store import atomic_path, save_tensors

# ---------------------------------------------------------------------------------------------
# persona_vectors


def to_persona_vectors(
    vectors: Float[Tensor, "layer d_model"],
    layers: Sequence[int],
    n_layers: int,
    *,
    hook: str = DEFAULT_HOOK,
    skip_unsupported: bool = False,
) -> Float[Tensor, "hidden_state d_model"]:
    """The persona_vectors tensor [n_layers + 1, d_model] (float32, CPU) holding ``vectors[i]``
    at row ``hidden_state_index(layers[i], hook)`` and zeros elsewhere.

    The last block at resid_post would land in row ``n_layers``, which persona_vectors computes
    from the final norm's output: it raises, or with ``skip_unsupported=True`` its row stays
    zero (:func:`persona_blocks` says which blocks a file holds)."""
    block = check_layers(layers, vectors.shape[0], "to_persona_vectors")
    bad = [b for b in block if not 0 <= b < n_layers]
    if bad:
        raise TLExtractError(
            f"to_persona_vectors: layers {bad} are not blocks of a {n_layers}-block model."
        )
    keep = persona_blocks(block, n_layers, hook)
    if len(keep) < len(block) and not skip_unsupported:
        raise TLExtractError(
            f"to_persona_vectors: block {n_layers - 1} at hook_{hook} would go to row "
            f"{final_norm_row(n_layers)}, which persona_vectors computes from transformers' "
            f"hidden_states[{n_layers}], the final norm's output, not the last block's; drop it "
            "or pass skip_unsupported=True (the row stays zero)."
        )
    out = torch.zeros(n_layers + 1, vectors.shape[1], dtype=torch.float32)
    picked = [i for i, b in enumerate(block) if b in keep]
    rows = torch.tensor([hidden_state_index(block[i], hook) for i in picked], dtype=torch.long)
    out[rows] = vectors.detach().float().cpu()[picked]
    return out


def persona_blocks(layers: Sequence[int], n_layers: int, hook: str = DEFAULT_HOOK) -> list[int]:
    """The blocks of ``layers`` a persona_vectors file can hold exactly (all but the last block
    at resid_post), in the order given."""
    return [int(b) for b in layers if hidden_state_index(int(b), hook) < final_norm_row(n_layers)]


def save_persona_vectors(
    path: Path,
    vectors: Float[Tensor, "layer d_model"],
    layers: Sequence[int],
    n_layers: int,
    *,
    hook: str = DEFAULT_HOOK,
    skip_unsupported: bool = False,
) -> list[int]:
    """Write the persona_vectors ``.pt`` file (a bare tensor, as ``torch.save`` writes it);
    returns the blocks written. See :func:`to_persona_vectors` for the last block."""
    table = to_persona_vectors(
        vectors, layers, n_layers, hook=hook, skip_unsupported=skip_unsupported
    )
    save_tensors(Path(path), table)
    return persona_blocks(layers, n_layers, hook)


# ---------------------------------------------------------------------------------------------
# GGUF control vectors


def save_gguf(
    path: Path,
    vectors: Float[Tensor, "layer d_model"],
    layers: Sequence[int],
    model_hint: str,
    *,
    hook: str = DEFAULT_HOOK,
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
