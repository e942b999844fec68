"""How alike the traits' vectors are: cosine similarity between their saved mean_diff vectors."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor

from tlextract.ops.trait_vectors import TraitVectors
from tlextract.settings import RunSettings
from tlextract.stages.activations import current_activations_key
from tlextract.stages.judge import load_selection
from tlextract.stages.run import is_done
from tlextract.traits import POLARITIES


@dataclass(frozen=True)
class CosineMatrix:
    """``matrix[i][j]``: cosine similarity of the mean_diff vectors of ``traits[i]`` and
    ``traits[j]`` at ``layer``. ``missing`` says why a trait of the experiment is left out."""

    experiment: str
    model: str
    variant: str
    method: str
    layer: int
    hook_name: str
    traits: list[str]
    counts: dict[str, dict[str, int]]  # trait -> examples per polarity behind its vector
    matrix: list[list[float]]
    missing: dict[str, str]
    png: Path
    json: Path


def saved_vectors(run: RunSettings, method: str = "mean_diff") -> TraitVectors | None:
    """The run's saved vectors if they come from its current activations and as many kept
    examples as its current judgments keep (vectors files record no more than that)."""
    path = run.stage_dir("vectors") / f"{method}.pt"
    if not (path.exists() and is_done(run, "activations") and is_done(run, "judge")):
        return None
    vectors = TraitVectors.load(path)
    kept = load_selection(run).kept
    current = {
        "activations_fingerprint": current_activations_key(run),
        **{f"n_{p}": len(kept[p]) for p in POLARITIES},
    }
    return vectors if all(vectors.metadata.get(k) == v for k, v in current.items()) else None


def cosines(vectors: Float[Tensor, "trait d_model"]) -> Float[Tensor, "trait trait"]:
    """Pairwise cosine similarity in float64 (a zero vector gets 0 everywhere)."""
    v = vectors.double()
    unit = v / v.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(v.dtype).tiny)
    return (unit @ unit.T).clamp(-1.0, 1.0)
