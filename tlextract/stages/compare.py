"""``tx.compare`` (in memory) and the ``compare`` stage of a trait run: the run's own responses
teacher-forced through its model and through another of the same family, the shift of the
trait's projection per layer and per token (:mod:`tlextract.ops.compare`).

The stage writes ``comparison.pt`` and its ``meta.json`` under ``<run>/compare-<other>/``
(:func:`tlextract.settings.compare_dir`); its key names both models (a local directory by its
resolved path and each of its files' size and modification time), the responses, the
vectors, the layers, the hook and the dtype, so a second run is up to date, an interrupted one
resumes from its saved batches and a damaged output is redone.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tlextract.errors import TLExtractError
from tlextract.model.decoding import Model
from tlextract.model.source import backend_of
from tlextract.model.tokens import device_of
from tlextract.ops.compare import Comparison, Vectors, as_mapping, shift_batch
from tlextract.ops.fit import check_fit, check_same_family
from tlextract.ops.pool import hook_name
from tlextract.ops.steer import unit_direction
from tlextract.ops.trait_vectors import TraitVectors
from tlextract.settings import RunSettings, compare_dir
from tlextract.stages.common import batch_size
from tlextract.stages.compute import Shards, in_memory
from tlextract.stages.responses import RESPONSES, responses_key
from tlextract.stages.stage import Job, Stage, run_stage
from tlextract.store import fingerprint, load_tensors, save_tensors

OUTPUT = "comparison.pt"


def _checked(
    model: Model, other: Model, vectors: Vectors, layers: Sequence[int] | None, n_prompts: int,
    n_responses: int,
) -> tuple[dict[str, TraitVectors], tuple[int, ...]]:  # fmt: skip
    """The vectors by trait and the layers to read, once every refusal is made."""
    by_trait = as_mapping(vectors)
    if not by_trait:
        raise TLExtractError("compare: no vectors given; pass one trait's or several by name.")
    if n_prompts != n_responses:
        raise TLExtractError(f"compare: {n_prompts} prompts but {n_responses} responses.")
    check_same_family(model, other)
    asked = check_fit(model, next(iter(by_trait.values())), layers)
    for tv in by_trait.values():
        check_fit(model, tv, asked)
    return by_trait, asked


def compare(
    model: Model,
    other: Model,
    vectors: Vectors,
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    layers: Sequence[int] | None = None,
    *,
    hook: str | None = None,
    batch_size: int = 8,
    shards: Shards = in_memory,
    desc: str = "compare",
) -> Comparison:
    """``other`` against ``model``, its base, on the same tokens: each response ``prompt_ids[i] +
    response_ids[i]`` teacher-forced through both, read at ``hook`` (default the vectors'
    own, e.g. ``resid_post``; ``resid_mid`` or ``resid_pre`` read inside or before a block) at
    ``layers`` (default: all the vectors have); empty responses are left out. ``vectors``: one
    trait's, or several by name, all with those layers. Refused in one line when ``other`` is
    not of ``model``'s family or the vectors do not fit (:mod:`tlextract.ops.fit`). ``shards``:
    how the batches run (the stage saves each and resumes; default in memory)."""
    by_trait, asked = _checked(model, other, vectors, layers, len(prompt_ids), len(response_ids))
    hook = hook or next(iter(by_trait.values())).hook
    names = [hook_name(hook, layer) for layer in asked]
    units = torch.stack([
        torch.stack([unit_direction(model, tv, layer)[1].cpu() for layer in asked])
        for tv in by_trait.values()
    ])  # fmt: skip
    rows = [i for i, r in enumerate(response_ids) if len(r) > 0]
    if not rows:
        raise TLExtractError("compare: every response is empty; there is no token to compare on.")

    def compute(chunk: list[int]) -> list:
        picked = [rows[i] for i in chunk]
        return shift_batch(model, other, [prompt_ids[i] for i in picked],
                           [response_ids[i] for i in picked], names, units)  # fmt: skip

    def to_shard(idx: list[int], out: list) -> dict[str, Any]:
        return {"rows": idx, "residual": torch.stack([r for r, _ in out]),
                "tokens": [t for _, t in out]}  # fmt: skip

    def valid(idx: list[int], shard: Any) -> bool:
        residual = shard.get("residual") if isinstance(shard, dict) else None
        shape = (len(idx), len(asked), model.cfg.d_model)
        return isinstance(residual, Tensor) and shard["rows"] == idx and residual.shape == shape

    lengths = [len(prompt_ids[i]) + len(response_ids[i]) for i in rows]
    contents, _ = shards(lengths, batch_size, compute, to_shard, device_of(model), desc, valid)
    got = {i: (r, t) for s in contents
           for i, r, t in zip(s["rows"], s["residual"], s["tokens"], strict=True)}  # fmt: skip
    order = range(len(rows))
    return Comparison(
        base=model.cfg.model_name,
        other=other.cfg.model_name,
        hook=hook,
        layers=asked,
        rows=tuple(rows),
        units={t: units[k] for k, t in enumerate(by_trait)},
        residual_shift=torch.stack([got[i][0] for i in order]),
        token_shift={t: [got[i][1][:, :, k] for i in order] for k, t in enumerate(by_trait)},
    )


def model_identity(name: str) -> Any:
    """What names a model's weights in a key: a local directory (a model or a LoRA adapter) by
    its resolved path and each of its files' size and modification time (so weights saved
    again are compared again); any other name (embedded, hub id) as itself."""
    path = Path(name).expanduser()
    if not path.is_dir():
        return name
    # The directory's own files only: a training folder's checkpoint subfolders are not read.
    files = sorted(p for p in path.iterdir() if p.is_file())
    return {
        "path": str(path.resolve()),
        "files": {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files},
    }


def vectors_identity(vectors: TraitVectors) -> str:
    data = vectors.vectors.float().contiguous().numpy().tobytes()
    return fingerprint([vectors.trait, vectors.hook, list(vectors.layers),
                        hashlib.sha256(data).hexdigest()])  # fmt: skip


@dataclass(frozen=True)
class Plan:
    """What one run's comparison depends on beyond the run: the other model (its name and
    how it loads), the run's vectors, and where and how many responses to read."""

    other: str
    get_other: Callable[[], Model]
    vectors: TraitVectors
    layers: tuple[int, ...] | None = None
    hook: str | None = None
    max_samples: int | None = None


def compare_key(plan: Plan, run: RunSettings) -> str:
    return fingerprint({
        "base": model_identity(run.model),
        "base_backend": backend_of(run.model, run.model_backend),
        "other": model_identity(plan.other),
        "responses": responses_key(run),
        "vectors": vectors_identity(plan.vectors),
        "layers": plan.layers,
        "hook": plan.hook or plan.vectors.hook,
        "dtype": run.dtype,
        "max_samples": plan.max_samples,
    })  # fmt: skip


def _rows(plan: Plan, responses: Any) -> list[dict[str, Any]]:
    """The responses compared: the first ``max_samples`` by example index, both poles of an
    example together (so a cap keeps both poles)."""
    rows = sorted(responses, key=lambda r: (r["index"], r["polarity"]))
    rows = [r for r in rows if r["n_response_tokens"] > 0]
    return rows[: plan.max_samples] if plan.max_samples else rows


def compute_comparison(plan: Plan, job: Job) -> tuple[Comparison, list[dict[str, Any]]]:
    run = job.run
    base, other = job.get_model(), plan.get_other()
    rows = _rows(plan, job.inputs["responses"])
    if not rows:
        raise TLExtractError(
            f"[{run.trait.name}] every response of the run is empty: no token to compare on."
        )
    longest = max(len(r["prompt_ids"]) + r["n_response_tokens"] for r in rows)
    layers = plan.layers or plan.vectors.layers
    size = batch_size(run, base, longest, len(rows), layers)
    result = compare(
        base, other, plan.vectors, [r["prompt_ids"] for r in rows],
        [r["response_ids"] for r in rows], plan.layers, hook=plan.hook, batch_size=size,
        shards=job.sharded, desc=f"[{run.trait.name}] compare",
    )  # fmt: skip
    return result, [{k: r[k] for k in ("polarity", "index")} for r in rows]


def save_comparison(job: Job, out: tuple[Comparison, list[dict[str, Any]]]) -> dict[str, Any]:
    c, rows = out
    trait = c.traits[0]
    save_tensors(job.dir / OUTPUT, {
        "base": c.base, "other": c.other, "hook": c.hook, "layers": list(c.layers),
        "rows": list(c.rows), "examples": rows, "unit": c.units[trait],
        "residual_shift": c.residual_shift, "token_shift": c.token_shift[trait],
    })  # fmt: skip
    return dict(other=c.other, hook=c.hook, layers=list(c.layers), n_responses=len(rows))


def read_comparison(run: RunSettings, key: str, other: str) -> tuple[Comparison, list[Any]]:
    """The saved comparison, checked (shapes agree with each other)."""
    data = load_tensors(compare_dir(run, other) / OUTPUT)
    n, layers = len(data["rows"]), len(data["layers"])
    residual, tokens = data["residual_shift"], data["token_shift"]
    if residual.shape[:2] != (n, layers) or len(tokens) != n or len(data["examples"]) != n:
        raise ValueError(f"{OUTPUT}: {n} rows but tensors of {tuple(residual.shape)}")
    if any(t.ndim != 2 or t.shape[1] != layers for t in tokens):
        raise ValueError(f"{OUTPUT}: a response's token shifts are not [token, {layers}]")
    comparison = Comparison(
        data["base"], data["other"], data["hook"], tuple(data["layers"]), tuple(data["rows"]),
        {run.trait.name: data["unit"]}, residual, {run.trait.name: tokens},
    )  # fmt: skip
    return comparison, data["examples"]


def compare_stage(plan: Plan) -> Stage[tuple[Comparison, list[Any]]]:
    """The ``compare`` stage of a run against ``plan.other``."""
    return Stage(
        "compare", (RESPONSES,), OUTPUT, key=partial(compare_key, plan),
        compute=partial(compute_comparison, plan), save=save_comparison,
        load=lambda run, key: read_comparison(run, key, plan.other),
        folder=lambda run, name: compare_dir(run, plan.other),
    )  # fmt: skip


def run_comparison(
    plan: Plan, run: RunSettings, get_model: Callable[[], Model]
) -> tuple[Comparison, list[Any]]:
    """The run's comparison with ``plan.other`` (read back when up to date) and which
    responses its rows are (polarity, index)."""
    return run_stage(compare_stage(plan), run, get_model)
