"""The stages of one trait run, wired together: generate -> activations -> vectors.

Each stage writes into ``experiments/<exp>/<trait>/extraction/<stage>/`` and finishes by writing
``meta.json`` with a fingerprint of everything its output depends on. A rerun with the same
settings skips the stage; a changed setting recomputes that stage and the ones after it. While a
stage runs, each batch is saved as a shard, so an interrupted run resumes at the first missing
batch.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal

import torch
from datasets import Dataset, load_from_disk
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from tlextract.errors import TLExtractError
from tlextract.judge.keep import Selection, select, split_config
from tlextract.model.fast import decode_session
from tlextract.model.load import load_model
from tlextract.model.memory import GiB, HalvingBatches
from tlextract.ops import methods
from tlextract.ops.generate import device_of, generate_batch, tokenize, tokenizer_of
from tlextract.ops.pool import hook_name, pooled_activations, resolve_layers
from tlextract.ops.vectors import TraitVectors
from tlextract.stages.autobatch import auto_batch_size
from tlextract.store import (
    META,
    atomic_dir,
    clear_other_shards,
    fingerprint,
    load_tensors,
    read_json,
    save_tensors,
    shard_dir,
    stage_done,
    write_json,
)
from tlextract.traits import POLARITIES, VARIANTS, Experiment, Trait, Variant, build_examples

log = logging.getLogger(__name__)
STAGES = ("generate", "judge", "activations", "vectors")
MODES = ("two-stage", "combined")
Mode = Literal["two-stage", "combined"]


@dataclass(frozen=True)
class RunSettings:
    """Everything one trait run depends on, after command-line overrides."""

    experiment: Experiment
    trait: Trait
    model: str
    n_examples: int
    batch_size: int | Literal["auto"]
    layers: tuple[int, ...] | Literal["all"]
    device: str | None = None
    dtype: str = "float32"
    mode: Mode = "two-stage"
    variant: Variant = "instruction"
    judge: dict[str, Any] = field(default_factory=lambda: {"kind": "none"})
    memory_budget_gib: float | None = None  # for batch_size "auto"; None: memory.default_budget

    @property
    def out_dir(self) -> Path:
        return self.experiment.output_dir(self.trait.name, self.model, self.variant)

    def stage_dir(self, stage: str) -> Path:
        return self.out_dir / {"generate": "responses"}.get(stage, stage)


def settings_for(
    experiment: Experiment,
    trait: str,
    *,
    model: str | None = None,
    n_examples: int | None = None,
    batch_size: int | Literal["auto"] | None = None,
    layers: Sequence[int] | Literal["all"] | None = None,
    device: str | None = None,
    dtype: str = "float32",
    mode: Mode = "two-stage",
    variant: Variant | None = None,
    judge: Literal["none", "local"] | None = None,
    memory_budget_gib: float | None = None,
) -> RunSettings:
    """Settings for one trait; arguments left as None take the experiment's. ``judge`` switches
    the experiment's judge off ("none") or to the studied model itself ("local").
    ``batch_size="auto"`` picks the largest batch that fits ``memory_budget_gib``."""
    for name, value in (("n_examples", n_examples), ("batch_size", batch_size)):
        if value is not None and value != "auto" and (not isinstance(value, int) or value < 1):
            extra = " or 'auto'" if name == "batch_size" else ""
            raise TLExtractError(
                f"--{name.replace('_', '-')} must be an integer of at least 1{extra} "
                f"(got {value!r})."
            )
    if memory_budget_gib is not None and memory_budget_gib <= 0:
        raise TLExtractError(
            f"--memory-budget must be a positive number of GiB (got {memory_budget_gib})."
        )
    if mode not in MODES:
        raise TLExtractError(f"--mode {mode!r} is not a mode; use one of {', '.join(MODES)}.")
    variant = variant or experiment.variant
    if variant not in VARIANTS:
        raise TLExtractError(f"variant {variant!r} is unknown; use one of {', '.join(VARIANTS)}.")
    return RunSettings(
        experiment=experiment,
        trait=experiment.trait(trait),
        model=model or experiment.model,
        n_examples=n_examples or experiment.n_examples,
        batch_size=batch_size or experiment.batch_size,
        layers=experiment.layers
        if layers is None
        else ("all" if layers == "all" else tuple(sorted(set(layers)))),
        device=device,
        dtype=dtype,
        mode=mode,
        variant=variant,
        judge=_judge_config(experiment.judge, judge),
        memory_budget_gib=memory_budget_gib,
    )


def _judge_config(config: dict[str, Any], override: str | None) -> dict[str, Any]:
    if override is None:
        return config
    _, rules = split_config(config)
    if override == "none":
        return {"kind": "none", **rules}
    if override == "local":
        return {"kind": "local", "model": "self", **rules}
    raise TLExtractError(f"--judge {override!r}: use 'none' or 'local' (or the experiment's).")


def model_loader(run: RunSettings) -> Callable[[], HookedTransformer]:
    """Load the model on first use only, so a run with nothing left to do starts instantly."""
    return cache(lambda: load_model(run.model, device=run.device, dtype=run.dtype))


def _versions() -> dict[str, str]:
    pkgs = ("tlextract", "torch", "transformer-lens", "transformers")
    return {p: importlib.metadata.version(p) for p in pkgs}


def _example_seed(seed: int, trait: str, polarity: str, index: int) -> int:
    digest = hashlib.sha256(f"{seed}:{trait}:{polarity}:{index}".encode()).hexdigest()
    return int(digest[:15], 16)


def _stage_meta(stage: str, key: str, run: RunSettings, **extra: Any) -> dict[str, Any]:
    return {
        "stage": stage,
        "fingerprint": key,
        "experiment": run.experiment.name,
        "trait": run.trait.name,
        "variant": run.variant,
        "model": run.model,
        "dtype": run.dtype,
        "versions": _versions(),
        **extra,
    }


# --- stage 1: responses -------------------------------------------------------------------------


def responses_key(run: RunSettings) -> str:
    exp, trait = run.experiment, run.trait
    return fingerprint(
        {
            "model": run.model,
            "dtype": run.dtype,
            "variant": run.variant,
            "prompts": (
                trait.natural
                if run.variant == "natural"
                else [[asdict(p) for p in trait.instructions], trait.questions]
            ),
            "prompt_style": exp.prompt_style,
            "n_examples": run.n_examples,
            "seed": exp.seed,
            "generation": asdict(exp.generation),
            # Combined mode records activations while generating, so its responses stage owns them.
            "capture": [run.layers, exp.hook] if run.mode == "combined" else None,
        }
    )


def _batch_size(
    run: RunSettings, model: HookedTransformer, length: int, n_items: int, layers: Sequence[int]
) -> int:
    """The run's batch size; for "auto", the largest that fits the memory budget for rows of
    ``length`` tokens (from peaks measured on this model)."""
    if run.batch_size != "auto":
        return run.batch_size
    budget = None if run.memory_budget_gib is None else run.memory_budget_gib * GiB
    size = auto_batch_size(model, length, n_items, layers, run.experiment.hook, budget)
    print(f"[{run.trait.name}] batch size auto: {size}")
    return size


def _batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped by prompt length (longest first) so rows in a batch pad little."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def generate_responses(run: RunSettings, get_model: Callable[[], HookedTransformer]) -> Dataset:
    """Stage 1: n responses per polarity, batched, sampled with one seed per example."""
    stage, key = run.stage_dir("generate"), responses_key(run)
    if stage_done(stage, key):
        print(f"[{run.trait.name}] responses: up to date, skipped ({stage})")
        return load_from_disk(str(stage / "dataset"))
    model = get_model()
    examples = build_examples(
        run.trait, run.n_examples, model.tokenizer, run.experiment.prompt_style, run.variant
    )
    prompt_ids = tokenize(model, [e.prompt for e in examples], run.experiment.prompt_style)
    layers = resolve_layers(run.layers, model.cfg.n_layers)
    capture = (
        [hook_name(run.experiment.hook, layer) for layer in layers]
        if run.mode == "combined"
        else []
    )
    gen = run.experiment.generation
    size = _batch_size(
        run, model, max(map(len, prompt_ids)) + gen.max_new_tokens, len(prompt_ids), layers
    )
    shards = shard_dir(stage, fingerprint([key, size]))
    clear_other_shards(stage, keep=shards.name.removeprefix("shards-"))
    shards.mkdir(parents=True, exist_ok=True)
    seeds = [
        _example_seed(run.experiment.seed, run.trait.name, e.polarity, e.index) for e in examples
    ]
    halving = HalvingBatches(size, device_of(model))
    batches = _batches([len(p) for p in prompt_ids], size)
    bar = tqdm(batches, desc=f"[{run.trait.name}] generate", unit="batch")
    tok = tokenizer_of(model)
    # One session for the stage: packed weights are checked once, not once per batch.
    with decode_session(model):
        for b, idx in enumerate(bar):
            path = shards / f"batch_{b:05d}.pt"
            if path.exists():
                continue  # finished before an interruption
            gens = halving.run(
                idx,
                lambda chunk: generate_batch(
                    model,
                    [prompt_ids[i] for i in chunk],
                    gen,
                    [seeds[i] for i in chunk],
                    capture=capture,
                ),
            )
            records = [
                {
                    **asdict(examples[i]),
                    "prompt_ids": prompt_ids[i],
                    "response_ids": g.response_ids,
                    "response": tok.decode(g.response_ids, skip_special_tokens=True),
                    "n_prompt_tokens": len(prompt_ids[i]),
                    "n_response_tokens": len(g.response_ids),
                    "stopped": g.stopped,
                    "acts": g.pooled,
                }
                for i, g in zip(idx, gens, strict=True)
            ]
            save_tensors(path, records)
    records = [r for p in sorted(shards.glob("batch_*.pt")) for r in load_tensors(p)]
    records.sort(key=lambda r: (POLARITIES.index(r["polarity"]), r["index"]))
    pooled = {(r["polarity"], r["index"]): r.pop("acts") for r in records}
    dataset = Dataset.from_list(records)
    with atomic_dir(stage / "dataset") as tmp:
        dataset.save_to_disk(str(tmp))
    if capture:  # before the responses meta, so "responses done" implies "activations done"
        _write_activations(
            run,
            activations_key(run, key),
            layers,
            model.cfg.d_model,
            {k: v for k, v in pooled.items() if v is not None},
        )
    n_tokens = sum(r["n_response_tokens"] for r in records)
    write_json(
        stage / META,
        _stage_meta(
            "responses",
            key,
            run,
            n_examples_per_polarity=run.n_examples,
            counts={p: sum(r["polarity"] == p for r in records) for p in POLARITIES},
            n_generated_tokens=n_tokens,
            n_empty_responses=sum(r["n_response_tokens"] == 0 for r in records),
            prompt_style=run.experiment.prompt_style,
            generation=asdict(run.experiment.generation),
            seed=run.experiment.seed,
            batch_size=size,
            batch_size_requested=run.batch_size,
            batch_size_after_oom=halving.size if halving.size != size else None,
            mode=run.mode,
        ),
    )
    clear_other_shards(stage)
    print(f"[{run.trait.name}] responses: {len(records)} ({n_tokens} tokens) -> {stage}")
    return load_from_disk(str(stage / "dataset"))


def load_responses(run: RunSettings) -> tuple[Dataset, str]:
    stage = run.stage_dir("generate")
    key = responses_key(run)
    if not stage_done(stage, key):
        raise TLExtractError(
            f"{stage}: no responses for these settings yet. Run the 'generate' stage first "
            f"(python -m tlextract generate --experiment {run.experiment.name} "
            f"--traits {run.trait.name})."
        )
    return load_from_disk(str(stage / "dataset")), key


# --- stage 3: activations -----------------------------------------------------------------------


@dataclass(frozen=True)
class Activations:
    """Pooled activations per polarity; ``index[p][i]`` is the example index of row i."""

    pos: Float[Tensor, "n_pos layer d_model"]
    neg: Float[Tensor, "n_neg layer d_model"]
    pos_index: list[int]
    neg_index: list[int]
    layers: tuple[int, ...]
    hook: str
    key: str


def activations_key(run: RunSettings, responses_fp: str) -> str:
    return fingerprint(
        {
            "responses": responses_fp,
            "layers": run.layers,
            "hook": run.experiment.hook,
            "pooling": "response_mean",
            "dtype": run.dtype,
            "mode": run.mode,
        }
    )


def _load_activations(stage: Path, key: str) -> Activations:
    meta = read_json(stage / META)
    data = {p: load_tensors(stage / f"{p}.pt") for p in POLARITIES}
    return Activations(
        pos=data["pos"]["acts"],
        neg=data["neg"]["acts"],
        pos_index=data["pos"]["index"],
        neg_index=data["neg"]["index"],
        layers=tuple(meta["layers"]),
        hook=meta["hook"],
        key=key,
    )


def extract_activations(
    run: RunSettings, get_model: Callable[[], HookedTransformer]
) -> Activations:
    """Stage 2: a teacher-forced pass over prompt+response, hook outputs averaged over the
    response tokens (never the prompt or padding), float32."""
    responses, responses_fp = load_responses(run)
    stage, key = run.stage_dir("activations"), activations_key(run, responses_fp)
    if stage_done(stage, key):
        print(f"[{run.trait.name}] activations: up to date, skipped ({stage})")
        return _load_activations(stage, key)
    if run.mode == "combined":
        raise TLExtractError(
            f"{stage}: combined mode records activations during 'generate'; run that stage "
            "(or 'run') with --mode combined, or use --mode two-stage."
        )
    model = get_model()
    layers = resolve_layers(run.layers, model.cfg.n_layers)
    rows = [r for r in responses if r["n_response_tokens"] > 0]
    total = [len(r["prompt_ids"]) + r["n_response_tokens"] for r in rows]
    size = _batch_size(run, model, max(total), len(rows), layers)
    shards = shard_dir(stage, fingerprint([key, size]))
    clear_other_shards(stage, keep=shards.name.removeprefix("shards-"))
    shards.mkdir(parents=True, exist_ok=True)
    halving = HalvingBatches(size, device_of(model))
    batches = _batches(total, size)
    for b, idx in enumerate(tqdm(batches, desc=f"[{run.trait.name}] activations", unit="batch")):
        path = shards / f"batch_{b:05d}.pt"
        if path.exists():
            continue
        acts = halving.run(
            idx,
            lambda chunk: list(
                pooled_activations(
                    model,
                    [rows[i]["prompt_ids"] for i in chunk],
                    [rows[i]["response_ids"] for i in chunk],
                    layers,
                    run.experiment.hook,
                )
            ),
        )
        save_tensors(path, {"rows": idx, "acts": torch.stack(acts)})
    pooled: dict[tuple[str, int], Tensor] = {}
    for p in sorted(shards.glob("batch_*.pt")):
        shard = load_tensors(p)
        for i, acts in zip(shard["rows"], shard["acts"], strict=True):
            pooled[(rows[i]["polarity"], rows[i]["index"])] = acts
    result = _write_activations(run, key, layers, model.cfg.d_model, pooled)
    clear_other_shards(stage)
    return result


def _write_activations(
    run: RunSettings,
    key: str,
    layers: tuple[int, ...],
    d_model: int,
    pooled: dict[tuple[str, int], Tensor],
) -> Activations:
    """Save pooled activations per polarity (rows ordered by example index) and the stage meta."""
    stage = run.stage_dir("activations")
    counts = {}
    for pol in POLARITIES:
        index = sorted(i for p, i in pooled if p == pol)
        if not index:
            raise TLExtractError(
                f"{run.trait.name}: no {pol} response has any token, so there is nothing to "
                "average. Raise generation.max_new_tokens or check the prompts."
            )
        save_tensors(
            stage / f"{pol}.pt",
            {
                "acts": torch.stack([pooled[(pol, i)] for i in index]),
                "index": index,
            },
        )
        counts[pol] = len(index)
    n_empty = 2 * run.n_examples - len(pooled)
    if n_empty:
        log.warning("%d empty responses have no tokens to pool over and are left out", n_empty)
    write_json(
        stage / META,
        _stage_meta(
            "activations",
            key,
            run,
            mode=run.mode,
            layers=list(layers),
            hook=run.experiment.hook,
            hook_names=[hook_name(run.experiment.hook, layer) for layer in layers],
            pooling="mean over response tokens (the residual at each response token position)",
            counts=counts,
            n_empty_responses_left_out=n_empty,
            d_model=d_model,
        ),
    )
    print(
        f"[{run.trait.name}] activations ({run.mode}): {counts} x {len(layers)} layers -> {stage}"
    )
    return _load_activations(stage, key)


def load_activations(run: RunSettings) -> Activations:
    _, responses_fp = load_responses(run)
    stage, key = run.stage_dir("activations"), activations_key(run, responses_fp)
    if not stage_done(stage, key):
        raise TLExtractError(
            f"{stage}: no activations for these settings yet. Run the 'activations' stage first."
        )
    return _load_activations(stage, key)


# --- stage 3: vectors ---------------------------------------------------------------------------


# --- stage 2: judge ------------------------------------------------------------------------------


def judge_key(run: RunSettings, responses_fp: str) -> str:
    return fingerprint(
        {"responses": responses_fp, "judge": run.judge, "eval_prompt": run.trait.eval_prompt}
    )


def select_responses(run: RunSettings, get_model: Callable[[], HookedTransformer]) -> Selection:
    """Score every response with the experiment's judge and keep the clear cases."""
    responses, responses_fp = load_responses(run)
    stage, key = run.stage_dir("judge"), judge_key(run, responses_fp)
    if stage_done(stage, key):
        print(f"[{run.trait.name}] judge: up to date, skipped ({stage})")
        return _load_selection(stage)
    sel = select(
        list(responses),
        run.trait.eval_prompt,
        run.judge,
        stage / "judge_cache.jsonl",
        get_model,
        where=f"{run.experiment.path / 'experiment.json'} ({run.trait.name})",
    )
    write_json(stage / "judgments.json", sel.judgments)
    write_json(stage / META, _stage_meta("judge", key, run, kept_index=sel.kept, **sel.summary))
    s = sel.summary
    print(
        f"[{run.trait.name}] judge ({s['judge']}): kept {s['kept']} of {s['generated']}, "
        f"missing {s['missing']}, mean trait score {s['mean_score']} -> {stage}"
    )
    return sel


def _load_selection(stage: Path) -> Selection:
    meta = read_json(stage / META)
    summary = {
        k: meta[k]
        for k in ("judge", "rules", "generated", "judged", "missing", "kept", "mean_score")
    }
    return Selection(
        kept=meta["kept_index"], judgments=read_json(stage / "judgments.json"), summary=summary
    )


def load_selection(run: RunSettings) -> Selection:
    _, responses_fp = load_responses(run)
    stage = run.stage_dir("judge")
    if not stage_done(stage, judge_key(run, responses_fp)):
        raise TLExtractError(f"{stage}: responses not judged yet. Run the 'judge' stage first.")
    return _load_selection(stage)


# --- stage 4: vectors ---------------------------------------------------------------------------


def vectors_key(activations_fp: str, kept: dict[str, list[int]], method: str) -> str:
    return fingerprint({"activations": activations_fp, "kept": kept, "method": method})


def extract_vectors(
    run: RunSettings, acts: Activations, selection: Selection, method: str = "mean_diff"
) -> TraitVectors:
    """Stage 4: one direction per layer from the pooled activations of the kept examples."""
    stage = run.stage_dir("vectors")
    key = vectors_key(acts.key, selection.kept, method)
    path = stage / f"{method}.pt"
    if stage_done(stage, key) and path.exists():
        print(f"[{run.trait.name}] vectors: up to date, skipped ({path})")
        return TraitVectors.load(path)
    pos, neg = (
        _rows(a, idx, selection.kept[p])
        for a, idx, p in ((acts.pos, acts.pos_index, "pos"), (acts.neg, acts.neg_index, "neg"))
    )
    vecs = methods.get_method(method)(pos, neg)
    judge = {
        "judge": selection.summary["judge"],
        "kept": selection.summary["kept"],
        "mean_score": selection.summary["mean_score"],
    }
    tv = TraitVectors(
        trait=run.trait.name,
        method=method,
        model=run.model,
        hook=acts.hook,
        layers=acts.layers,
        vectors=vecs,
        metadata={
            "experiment": run.experiment.name,
            "variant": run.variant,
            "n_pos": pos.shape[0],
            "n_neg": neg.shape[0],
            "norms": [round(float(n), 6) for n in vecs.norm(dim=-1)],
            "activations_fingerprint": acts.key,
            "fingerprint": key,
            **judge,
        },
    )
    tv.save(path)
    write_json(
        stage / META,
        _stage_meta(
            "vectors",
            key,
            run,
            method=method,
            layers=list(acts.layers),
            hook=acts.hook,
            hook_names=[tv.hook_name(layer) for layer in acts.layers],
            counts={"pos": pos.shape[0], "neg": neg.shape[0]},
            norms=tv.metadata["norms"],
            **judge,
        ),
    )
    print(
        f"[{run.trait.name}] vectors: {method} for {len(acts.layers)} layers from "
        f"{pos.shape[0]} pos / {neg.shape[0]} neg -> {path}"
    )
    return tv


def _rows(
    acts: Float[Tensor, "n layer d_model"], index: list[int], keep: list[int]
) -> Float[Tensor, "k layer d_model"]:
    """The rows of kept examples (an empty response has no activation row and is never kept)."""
    where = {ix: row for row, ix in enumerate(index)}
    return acts[[where[i] for i in keep]]


def run_trait(
    run: RunSettings,
    stages: Sequence[str] = STAGES,
    get_model: Callable[[], HookedTransformer] | None = None,
) -> TraitVectors | None:
    """Run the given stages of one trait in order; returns the vectors when that stage ran."""
    get_model = get_model or model_loader(run)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise TLExtractError(f"unknown stage {unknown[0]!r}; stages: {', '.join(STAGES)}.")
    if "activations" in stages and run.layers != "all":
        # Fail on impossible layers before any stage writes a file.
        if not stage_done(run.stage_dir("activations"), activations_key(run, responses_key(run))):
            resolve_layers(run.layers, get_model().cfg.n_layers)
    acts: Activations | None = None
    selection: Selection | None = None
    vectors = None
    if "generate" in stages:
        generate_responses(run, get_model)
    if "judge" in stages:
        selection = select_responses(run, get_model)
    if "activations" in stages:
        acts = extract_activations(run, get_model)
    if "vectors" in stages:
        vectors = extract_vectors(
            run, acts or load_activations(run), selection or load_selection(run)
        )
    return vectors
