"""``TraitVectors``: one direction per layer, with its hook names and provenance, saved to and
loaded from every vector format tlextract knows (the formats' conventions: ops/formats.py)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from jaxtyping import Float
from torch import Tensor

from tlextract.config import DEFAULT_HOOK
from tlextract.errors import TLExtractError
from tlextract.inputs import PathArg
from tlextract.ops.formats import save_gguf, save_persona_vectors
from tlextract.ops.pool import hook_name
from tlextract.ops.vector_files import persona_fields, read_gguf, read_persona, read_vectors
from tlextract.ops.vector_files import save_safetensors as write_safetensors
from tlextract.store import save_tensors

# "pt": tlextract's own file (everything, read back exactly); the others are for other tools.
VectorFormat = Literal["pt", "safetensors", "gguf", "persona_vectors"]
FORMATS: tuple[str, ...] = get_args(VectorFormat)


@dataclass(frozen=True)
class TraitVectors:
    """Vectors of one trait and method. ``vectors[i]`` belongs to block ``layers[i]`` at
    ``hook_name(layers[i])``."""

    trait: str
    method: str
    model: str
    hook: str
    layers: tuple[int, ...]
    vectors: Float[Tensor, "layer d_model"]
    metadata: dict[str, Any] = field(default_factory=dict)

    def hook_name(self, layer: int) -> str:
        return hook_name(self.hook, layer)

    def __getitem__(self, layer: int) -> Float[Tensor, " d_model"]:
        if layer not in self.layers:
            raise KeyError(f"no {self.method} vector for layer {layer}; have {list(self.layers)}")
        return self.vectors[self.layers.index(layer)]

    def save(
        self,
        path: PathArg,
        format: VectorFormat = "pt",
        *,
        n_layers: int | None = None,
        model_hint: str | None = None,
        skip_unsupported: bool = False,
    ) -> list[int]:
        """Write the vectors in ``format``; returns the blocks written. :meth:`load` reads
        every format back, whatever the file's name.

        - ``"pt"``: tlextract's file, everything kept;
        - ``"safetensors"``: one tensor ``layers.{l}`` per block and string metadata;
        - ``"gguf"``: a llama.cpp / repeng control vector (``model_hint``: the model family
          those tools show, default this run's model name);
        - ``"persona_vectors"``: their ``[n_layers + 1, d_model]`` table (``n_layers``: the
          model's number of blocks, required).

        GGUF and persona_vectors cannot hold every block (see ops/formats.py): such blocks
        raise, or are left out with ``skip_unsupported=True``."""
        hook, skip = self.hook, skip_unsupported
        if format == "pt":
            save_tensors(path, self._fields())
        elif format == "safetensors":
            self.save_safetensors(path)
        elif format == "gguf":
            hint = model_hint or self.model
            return save_gguf(
                Path(path), self.vectors, self.layers, hint, hook=hook, skip_unsupported=skip
            )
        elif format == "persona_vectors":
            if n_layers is None:
                raise TLExtractError(
                    "TraitVectors.save(format='persona_vectors') needs n_layers, the model's "
                    "number of blocks (model.cfg.n_layers)."
                )
            return save_persona_vectors(
                Path(path), self.vectors, self.layers, n_layers, hook=hook, skip_unsupported=skip
            )
        else:
            raise TLExtractError(
                f"TraitVectors.save: format {format!r} is not one of {', '.join(FORMATS)}."
            )
        return list(self.layers)

    def _fields(self) -> dict[str, Any]:
        return {
            "trait": self.trait,
            "method": self.method,
            "model": self.model,
            "hook": self.hook,
            "layers": list(self.layers),
            "hook_names": [self.hook_name(layer) for layer in self.layers],
            "vectors": self.vectors.contiguous(),
            "metadata": self.metadata,
        }

    def save_safetensors(self, path: PathArg) -> None:
        """The portable copy: one tensor ``layers.{l}`` per block and string metadata that any
        safetensors reader shows; see :func:`vector_files.save_safetensors`."""
        write_safetensors(
            path, self.vectors, self.layers, trait=self.trait, method=self.method,
            model=self.model, hook=self.hook, metadata=self.metadata,
        )  # fmt: skip

    @classmethod
    def load(cls, path: PathArg, *, hook: str = DEFAULT_HOOK) -> TraitVectors:
        """Vectors from any file tlextract reads, recognised by content whatever its name: ours
        (:meth:`save`), safetensors, persona_vectors ``.pt`` or a GGUF control vector. ``hook`` is
        the hook of files that do not record one (persona_vectors, GGUF)."""
        return cls(**read_vectors(Path(path), hook=hook))


def from_persona_vectors(
    table: Float[Tensor, "hidden_state d_model"],
    layers: Sequence[int] | None = None,
    *,
    hook: str = DEFAULT_HOOK,
) -> TraitVectors:
    """Inverse of :func:`~tlextract.ops.formats.to_persona_vectors`: the rows for ``layers``, as
    float32 (default: every block whose row is exact, which at resid_post drops the embedding
    row 0 and the final-norm row ``n_layers``, i.e. the last block; see
    :func:`~tlextract.ops.vector_files.persona_fields`)."""
    return TraitVectors(**persona_fields(table, layers, hook=hook))


def load_persona_vectors(
    path: Path, layers: Sequence[int] | None = None, *, hook: str = DEFAULT_HOOK
) -> TraitVectors:
    """Read a persona_vectors ``.pt`` file, only ``layers`` (see :func:`from_persona_vectors`);
    :meth:`TraitVectors.load` reads it with the default layers."""
    return TraitVectors(**read_persona(Path(path), layers, hook=hook))


def load_gguf(path: Path, *, hook: str = DEFAULT_HOOK) -> TraitVectors:
    """Read a GGUF control vector (ours, repeng's or llama.cpp's ``cvector-generator``), as
    :meth:`TraitVectors.load` does.

    Rows come back sorted by block; ``direction.{i}`` becomes block ``i`` at resid_post
    (``i + 1`` at resid_pre). Values are returned exactly as stored (float32).
    """
    return TraitVectors(**read_gguf(Path(path), hook=hook))
