"""Vector files of every format tlextract reads, recognised by content; the safetensors codec.

- tlextract ``.pt``: ``torch.save`` of a dict (trait, method, model, hook, layers, hook_names,
  vectors, metadata), as :meth:`TraitVectors.save` writes it;
- persona_vectors ``.pt``: one float tensor [n_layers + 1, d_model] (see formats.py);
- GGUF control vectors (llama.cpp, repeng): the magic bytes ``GGUF`` (see formats.py);
- safetensors: one [d_model] tensor ``layers.{l}`` per TransformerLens block ``l`` (the
  ``dict[layer, tensor]`` that repeng and steering-vectors keep in memory, readable without
  knowing the layer list) and string metadata; see :func:`save_safetensors`.

Readers return the fields of a ``TraitVectors`` as a plain dict: ops/trait_vectors.py builds the
class from them and formats.py builds on the class, so this module imports neither
(no import cycle).
docs/vectors.md describes the formats for users.
"""

from __future__ import annotations

import importlib.metadata
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypedDict

import gguf
import numpy as np
import torch
from jaxtyping import Float
from safetensors import safe_open
from safetensors.torch import save
from torch import Tensor

from tlextract.config import DEFAULT_HOOK
from tlextract.errors import TLExtractError
from tlextract.inputs import PathArg
from tlextract.ops.pool import hook_name
from tlextract.store import atomic_path

GGUF_ARCH = "controlvector"
KNOWN = "tlextract .pt, persona_vectors .pt, GGUF control vectors and safetensors"
_OFFSET = {"resid_post": 1, "resid_pre": 0}  # hidden_states row = block + offset
_SAVED_KEYS = {"trait", "method", "model", "hook", "layers", "vectors", "metadata"}
_MAX_SAFETENSORS_HEADER = 100_000_000  # the safetensors library's own limit
_TORCH_MAGIC = (b"PK\x03\x04", b"\x80")  # torch.save's zip archive; its legacy pickle format


class VectorFields(TypedDict):
    """The fields of a ``TraitVectors``."""

    trait: str
    method: str
    model: str
    hook: str
    layers: tuple[int, ...]
    vectors: Tensor
    metadata: dict[str, Any]


def _offset(hook: str) -> int:
    if hook not in _OFFSET:
        raise TLExtractError(
            f"hook {hook!r} has no hidden_states equivalent; export vectors extracted at "
            f"{' or '.join(_OFFSET)}."
        )
    return _OFFSET[hook]


def hidden_state_index(layer: int, hook: str = DEFAULT_HOOK) -> int:
    """Row of a persona_vectors table, numbered like transformers' ``hidden_states``, that
    :func:`to_persona_vectors` uses for ``blocks.{layer}.hook_{hook}``.

    ``hidden_states[row]`` itself holds that activation for every block but one: the last
    block's output (``layer = n_layers - 1`` at resid_post) is not among transformers'
    ``hidden_states``, whose last entry ``hidden_states[n_layers]`` is the final norm's output
    (``ln_final`` applied to it, weight included). See :func:`final_norm_row`.
    """
    return layer + _offset(hook)


def final_norm_row(n_layers: int) -> int:
    """The row of transformers' ``hidden_states`` (and of a persona_vectors table) that is the
    final norm's output, not any block's: the last, ``n_layers``."""
    return n_layers


def gguf_layer_index(layer: int, hook: str = DEFAULT_HOOK) -> int:
    """The ``i`` of the GGUF tensor ``direction.{i}`` for ``blocks.{layer}.hook_{hook}``: the
    llama.cpp layer whose output the vector is added to (>= 1 for llama.cpp to accept it)."""
    return hidden_state_index(layer, hook) - 1


def layer_convention(hook: str) -> str:
    """What layer ``l`` means, in words, for files that other tools read; true for every layer."""
    where = f"layer l = TransformerLens block l, read at blocks.l.hook_{hook}"
    if hook not in _OFFSET:
        return f"{where} (no transformers hidden_states equivalent)"
    if hook == "resid_pre":
        return f"{where} = transformers hidden_states[l], for every block l"
    return (
        f"{where} (the output of block l) = transformers hidden_states[l+1] for every block but "
        "the last; the last block's output is not among transformers' hidden_states, whose last "
        "entry hidden_states[n_layers] is the final norm's output"
    )


def check_layers(layers: Sequence[int], n_vectors: int, what: str) -> list[int]:
    """``layers`` as ints, one per vector and none twice."""
    out = [int(x) for x in layers]
    if len(out) != n_vectors:
        raise TLExtractError(f"{what}: {len(out)} layer indices for {n_vectors} vectors.")
    if len(set(out)) != len(out):
        raise TLExtractError(f"{what}: duplicate layer indices in {out}.")
    return out


def _one_line(err: Exception) -> str:
    """The first sentence of a library's error message (some run on for lines)."""
    text = " ".join(str(err).split())
    return text.split(". ")[0].rstrip(".") or type(err).__name__


def _unknown(path: Path, why: str) -> TLExtractError:
    return TLExtractError(f"{path}: {why}; tlextract reads {KNOWN} (see docs/vectors.md).")


# ---------------------------------------------------------------------------------------------
# recognising a file


def detect_format(path: Path) -> str | None:
    """``"gguf"``, ``"safetensors"``, ``"torch"`` or None, from the first bytes of ``path``."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head.startswith(b"GGUF"):
        return "gguf"
    # safetensors: an 8-byte little-endian header length, then the JSON header
    if len(head) == 9 and head[8:] == b"{":
        if int.from_bytes(head[:8], "little") <= _MAX_SAFETENSORS_HEADER:
            return "safetensors"
    if head.startswith(_TORCH_MAGIC):
        return "torch"
    return None


def read_vectors(path: Path, *, hook: str = DEFAULT_HOOK) -> VectorFields:
    """The vectors in ``path``, whatever its format; ``hook`` is used by files that do not record
    theirs (persona_vectors, GGUF, safetensors without tlextract's metadata)."""
    fmt = detect_format(path)
    if fmt == "gguf":
        return read_gguf(path, hook=hook)
    if fmt == "safetensors":
        return read_safetensors(path, hook=hook)
    if fmt == "torch":
        return _read_torch(path, hook=hook)
    raise _unknown(path, "empty file" if path.stat().st_size == 0 else "unrecognised content")


def _read_torch(path: Path, *, hook: str) -> VectorFields:
    obj = _torch_object(path)
    if isinstance(obj, dict) and _SAVED_KEYS <= obj.keys():  # TraitVectors.save
        return VectorFields(
            trait=obj["trait"], method=obj["method"], model=obj["model"], hook=obj["hook"],
            layers=tuple(obj["layers"]), vectors=obj["vectors"], metadata=obj["metadata"],
        )  # fmt: skip
    if _is_persona_table(obj):
        return persona_fields(obj, hook=hook)
    raise _unknown(path, f"a torch file holding {_describe(obj)}")


def _torch_object(path: Path) -> Any:
    try:  # through a file object: torch.load picks its reader by a path's extension
        with open(path, "rb") as f:
            return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors come in many types
        raise _unknown(path, f"not a readable torch file, or truncated ({_one_line(err)})") from err


def _is_persona_table(obj: Any) -> bool:
    return isinstance(obj, Tensor) and obj.ndim == 2 and obj.is_floating_point()


def _describe(obj: Any) -> str:
    return type(obj).__name__ + (f" of shape {tuple(obj.shape)}" if isinstance(obj, Tensor) else "")


# ---------------------------------------------------------------------------------------------
# persona_vectors


def persona_fields(
    table: Float[Tensor, "hidden_state d_model"],
    layers: Sequence[int] | None = None,
    *,
    hook: str = DEFAULT_HOOK,
) -> VectorFields:
    """The rows of a persona_vectors table for ``layers``, as float32.

    persona_vectors fills row ``r`` from transformers' ``hidden_states[r]``, so row ``l + 1`` is
    block ``l``'s output for every block but the last, and the last row (``n_layers``) is the
    final norm's output, which is no ``blocks.*`` hook. That row is never read: the default
    ``layers`` are the blocks whose rows are exact (``0..n_layers-2`` at resid_post, dropping
    the embedding row 0 too; ``0..n_layers-1`` at resid_pre), asking for block ``n_layers - 1``
    at resid_post raises, and the metadata says which row was left out and why.
    """
    n_layers = table.shape[0] - 1
    last = final_norm_row(n_layers)
    exact = [b for b in range(n_layers) if 0 <= hidden_state_index(b, hook) < last]
    block = exact if layers is None else [int(x) for x in layers]
    rows = [hidden_state_index(b, hook) for b in block]
    if last in rows:
        raise TLExtractError(
            f"from_persona_vectors: row {last} of this {n_layers}-block table is the final "
            f"norm's output (persona_vectors fills it from transformers' hidden_states[{last}]), "
            f"not blocks.{n_layers - 1}.hook_{hook}; leave block {n_layers - 1} out (the "
            f"default), or read the row yourself: torch.load(path)[{last}]."
        )
    bad = [b for b, r in zip(block, rows, strict=True) if not 0 <= r <= n_layers]
    if bad:
        raise TLExtractError(
            f"from_persona_vectors: layers {bad} are outside this {n_layers}-block table."
        )
    picked = table.detach().float()[torch.tensor(rows, dtype=torch.long)]
    fields = _imported(picked, block, hook, "persona_vectors")
    fields["metadata"]["not_read"] = (
        f"row {last}: the final norm's output (transformers hidden_states[{last}]), no block's"
    )
    return fields


def read_persona(
    path: Path, layers: Sequence[int] | None = None, *, hook: str = DEFAULT_HOOK
) -> VectorFields:
    """A persona_vectors ``.pt`` file; see :func:`persona_fields`."""
    table = _torch_object(path)
    if not _is_persona_table(table):
        raise TLExtractError(
            f"{path}: expected one float tensor [n_layers + 1, d_model] (persona_vectors "
            f"layout), got {_describe(table)}."
        )
    return persona_fields(table, layers, hook=hook)


# ---------------------------------------------------------------------------------------------
# GGUF control vectors


def _field_str(reader: gguf.GGUFReader, key: str) -> str | None:
    f = reader.get_field(key)
    if f is None:
        return None
    value = f.contents()
    return value if isinstance(value, str) else str(value)


def read_gguf(path: Path, *, hook: str = DEFAULT_HOOK) -> VectorFields:
    """A GGUF control vector (ours, repeng's or llama.cpp's ``cvector-generator``).

    Rows come back sorted by block; ``direction.{i}`` becomes block ``i`` at resid_post
    (``i + 1`` at resid_pre). Values are returned exactly as stored (float32).
    """
    offset = _offset(hook)
    try:
        reader = gguf.GGUFReader(path)
    except Exception as err:  # the reader raises ValueError, struct.error, ...
        raise TLExtractError(f"{path}: truncated or corrupt GGUF file ({_one_line(err)}).") from err
    arch = _field_str(reader, "general.architecture")
    if arch != GGUF_ARCH:
        raise TLExtractError(
            f"{path}: general.architecture is {arch!r}, not {GGUF_ARCH!r}: not a control vector."
        )
    by_block: dict[int, np.ndarray] = {}
    for t in reader.tensors:
        prefix, _, suffix = t.name.partition(".")
        if prefix != "direction" or not suffix.isdigit():
            raise TLExtractError(f"{path}: unexpected tensor {t.name!r} (want direction.N).")
        if t.tensor_type != gguf.GGMLQuantizationType.F32:
            raise TLExtractError(f"{path}: {t.name} is {t.tensor_type.name}, expected F32.")
        by_block[int(suffix) + 1 - offset] = np.array(t.data, dtype=np.float32).reshape(-1)
    if not by_block:
        raise TLExtractError(f"{path}: no direction tensors.")
    block = sorted(by_block)
    vectors = torch.from_numpy(np.stack([by_block[b] for b in block]))
    hint = _field_str(reader, f"{GGUF_ARCH}.model_hint") or ""
    return _imported(vectors, block, hook, "gguf", model=hint)


def _imported(
    vectors: Float[Tensor, "layer d_model"],
    layers: Sequence[int],
    hook: str,
    fmt: str,
    model: str = "",
) -> VectorFields:
    """Vectors read from another tool's file: no trait or method recorded there."""
    return VectorFields(trait="", method="imported", model=model, hook=hook, layers=tuple(layers),
                        vectors=vectors, metadata={"format": fmt})  # fmt: skip


# ---------------------------------------------------------------------------------------------
# safetensors


def save_safetensors(
    path: PathArg,
    vectors: Float[Tensor, "layer d_model"],
    layers: Sequence[int],
    *,
    trait: str,
    method: str,
    model: str,
    hook: str,
    metadata: dict[str, Any],
) -> None:
    """Write tensors ``layers.{l}`` ([d_model], dtype kept) and string metadata, atomically.

    Metadata: trait, method, model, hook, ``layers`` (JSON, the row order), ``hook_names``,
    ``layer_convention``, ``norms`` (JSON, per layer), ``n_pos``/``n_neg`` when known,
    ``tlextract_version``, and ``metadata``: the whole metadata dict as JSON (what
    :func:`read_safetensors` restores; the other keys are for tools that know nothing of tlextract).
    """
    block = check_layers(layers, vectors.shape[0], "save_safetensors")
    try:
        extra = json.dumps(metadata, sort_keys=True)
    except (TypeError, ValueError) as err:
        raise TLExtractError(f"{path}: metadata is not JSON ({err}).") from err
    header = {
        "trait": trait, "method": method, "model": model, "hook": hook,
        "layers": json.dumps(block),
        "hook_names": json.dumps([hook_name(hook, b) for b in block]),
        "layer_convention": layer_convention(hook),
        "norms": json.dumps(vectors.detach().float().norm(dim=-1).tolist()),
        "tlextract_version": importlib.metadata.version("tlextract"),
        "metadata": extra,
    } | {k: str(metadata[k]) for k in ("n_pos", "n_neg") if k in metadata}  # fmt: skip
    # each row cloned into its own storage: safetensors refuses tensors that share memory
    tensors = {
        f"layers.{b}": row.clone() for b, row in zip(block, vectors.detach().cpu(), strict=True)
    }
    data = save(tensors, metadata=header)  # bytes: safetensors' own file writer makes it 0600
    with atomic_path(Path(path)) as tmp:
        tmp.write_bytes(data)


def read_safetensors(path: Path, *, hook: str = DEFAULT_HOOK) -> VectorFields:
    """Inverse of :func:`save_safetensors`; also reads ``layers.{l}`` tensors another tool wrote
    (without tlextract's metadata: blocks sorted, hook ``hook``, method "imported")."""
    try:
        with safe_open(path, framework="pt") as f:
            header = f.metadata() or {}
            by_layer = {_layer_of(path, name): f.get_tensor(name) for name in f.keys()}
    except TLExtractError:
        raise
    except Exception as err:  # SafetensorError, OSError, ...
        msg = f"{path}: truncated or corrupt safetensors file ({_one_line(err)})."
        raise TLExtractError(msg) from err
    if not by_layer:
        raise TLExtractError(f"{path}: no layers.N tensors.")
    layers = _header_json(path, header, "layers", sorted(by_layer))
    if sorted(layers) != sorted(by_layer):
        raise TLExtractError(
            f"{path}: metadata lists layers {layers}; tensors are for {sorted(by_layer)}."
        )
    rows = [by_layer[b] for b in layers]
    if len({r.shape for r in rows}) != 1 or rows[0].ndim != 1:
        raise TLExtractError(f"{path}: layers.N tensors must all have shape [d_model].")
    return VectorFields(
        trait=header.get("trait", ""), method=header.get("method", "imported"),
        model=header.get("model", ""), hook=header.get("hook", hook), layers=tuple(layers),
        vectors=torch.stack(rows),
        metadata=_header_json(path, header, "metadata", {"format": "safetensors"}),
    )  # fmt: skip


def _layer_of(path: Path, name: str) -> int:
    prefix, _, suffix = name.partition(".")
    if prefix != "layers" or not suffix.isdigit():
        raise TLExtractError(f"{path}: unexpected tensor {name!r} (want layers.N).")
    return int(suffix)


def _header_json(path: Path, header: dict[str, str], key: str, default: Any) -> Any:
    if key not in header:
        return default
    try:
        return json.loads(header[key])
    except json.JSONDecodeError as err:
        raise TLExtractError(f"{path}: metadata {key!r} is not JSON ({err}).") from err
