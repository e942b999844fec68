"""``TraitVectors``: one direction per layer, with its hook names and provenance."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jaxtyping import Float
from torch import Tensor

from tlextract.config import DEFAULT_HOOK
from tlextract.inputs import PathArg
from tlextract.ops import vector_files
from tlextract.ops.pool import hook_name
from tlextract.store import save_tensors


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

    def save(self, path: PathArg) -> None:
        save_tensors(
            path,
            {
                "trait": self.trait,
                "method": self.method,
                "model": self.model,
                "hook": self.hook,
                "layers": list(self.layers),
                "hook_names": [self.hook_name(layer) for layer in self.layers],
                "vectors": self.vectors.contiguous(),
                "metadata": self.metadata,
            },
        )

    def save_safetensors(self, path: PathArg) -> None:
        """The portable copy: one tensor ``layers.{l}`` per block and string metadata that any
        safetensors reader shows; see :func:`vector_files.save_safetensors`."""
        vector_files.save_safetensors(
            path, self.vectors, self.layers, trait=self.trait, method=self.method,
            model=self.model, hook=self.hook, metadata=self.metadata,
        )  # fmt: skip

    @classmethod
    def load(cls, path: PathArg, *, hook: str = DEFAULT_HOOK) -> TraitVectors:
        """Vectors from any file tlextract reads, recognised by content whatever its name: ours
        (:meth:`save`), safetensors, persona_vectors ``.pt`` or a GGUF control vector. ``hook`` is
        the hook of files that do not record one (persona_vectors, GGUF)."""
        return cls(**vector_files.read_vectors(Path(path), hook=hook))
