"""Stage 1, responses: n sampled responses per polarity, batched, one seed per example.

The run's engine generates: TransformerLens (in combined mode recording the activations while it
generates; this stage then also saves them, ``pooled.pt``, and the activations stage reads them
from here) or vLLM (token ids in and out; the TransformerLens model is not loaded until the
activations stage). Sharding, resuming and damage checks are the same for both.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import torch
from datasets import Dataset, load_from_disk
from torch import Tensor

from tlextract.engines.base import Engine
from tlextract.engines.registry import Plan, engine_identity, engine_tokenizer, open_engine
from tlextract.errors import TLExtractError
from tlextract.model.decoding import Model
from tlextract.model.source import backend_of
from tlextract.model.tokens import device_of, tokenize
from tlextract.settings import RunSettings, pick_device
from tlextract.stages.common import batch_size
from tlextract.stages.compute import Capture, generate_records
from tlextract.stages.stage import GetModel, Job, Stage, need, run_stage
from tlextract.store import (
    META,
    atomic_dir,
    derive_seed,
    fingerprint,
    load_tensors,
    read_json,
    save_tensors,
)
from tlextract.traits import POLARITIES, build_examples, instruction_in_user_turn

log = logging.getLogger(__name__)
POOLED = "pooled.pt"  # combined mode: {(polarity, index): [layer, d_model]}


def responses_key(run: RunSettings) -> str:
    exp, trait = run.experiment, run.trait
    engine = engine_identity(run.engine)  # None for TransformerLens: earlier keys unchanged
    # A CUDA generator draws other samples than a CPU one from the same seed: a run resumed on
    # another device must not mix them. Left out on a CPU, so CPU keys stay what they were (the
    # dtype is in the key already); vLLM's samples come from its server, named by ``engine``.
    device = torch.device(pick_device(run.device)).type
    backend = backend_of(run.model, run.model_backend)
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
            **({"engine": engine} if engine else {}),
            **({"device": device} if engine is None and device != "cpu" else {}),
            # TransformerBridge runs transformers' own kernels (float32 rounding differs from
            # HookedTransformer's); left out for HookedTransformer, so earlier keys stay.
            **({"backend": "bridge"} if backend == "bridge" else {}),
        }
    )


@dataclass(frozen=True)
class Generated:
    """What the engine made, sorted by (polarity, index), and how the batches went."""

    records: list[dict[str, Any]]
    pooled: dict[tuple[str, int], Tensor | None]  # combined mode: recorded while generating
    plan: Plan
    size_after_oom: int
    peak_mib: float | None
    instruction_in_user_turn: bool


def compute_responses(job: Job) -> Generated:
    run = job.run
    tokenizer = engine_tokenizer(run, job.get_model)
    examples = build_examples(
        run.trait, run.n_examples, tokenizer, run.experiment.prompt_style, run.variant
    )
    prompt_ids = tokenize(tokenizer, [e.prompt for e in examples], run.experiment.prompt_style)
    gen = run.experiment.generation
    seeds = [derive_seed(run.experiment.seed, run.trait.name, e.polarity, e.index)
             for e in examples]  # fmt: skip
    longest = max(len(p) for p in prompt_ids) + gen.max_new_tokens
    model_plan = partial(_model_plan, run, longest, len(prompt_ids))
    with open_engine(run, job.get_model, tokenizer, longest, job.dir, model_plan) as (engine, plan):
        records, halving = generate_records(
            engine, tokenizer, prompt_ids, [asdict(e) for e in examples], seeds, gen, plan.size,
            job.sharded, plan.device, f"[{run.trait.name}] generate",
            plan.acts_shape,
        )  # fmt: skip
    records.sort(key=lambda r: (POLARITIES.index(r["polarity"]), r["index"]))
    pooled = {(r["polarity"], r["index"]): r.pop("acts") for r in records}
    in_user_turn = instruction_in_user_turn(tokenizer, run.experiment.prompt_style, run.variant)
    return Generated(records, pooled, plan, halving.size, _peak_mib(engine), in_user_turn)


def save_responses(job: Job, out: Generated) -> dict[str, Any]:
    run, stage, records, plan = job.run, job.dir, out.records, out.plan
    with atomic_dir(stage / "dataset") as tmp:
        Dataset.from_list(records).save_to_disk(str(tmp))
    if plan.layers is not None:
        save_tensors(stage / POOLED, {k: v for k, v in out.pooled.items() if v is not None})
    n_tokens = sum(r["n_response_tokens"] for r in records)
    log.info("[%s] responses: %d (%d tokens) -> %s", run.trait.name, len(records), n_tokens,
             stage)  # fmt: skip
    return dict(
        n_examples_per_polarity=run.n_examples,
        counts={p: sum(r["polarity"] == p for r in records) for p in POLARITIES},
        n_generated_tokens=n_tokens,
        n_empty_responses=sum(r["n_response_tokens"] == 0 for r in records),
        prompt_style=run.experiment.prompt_style, generation=asdict(run.experiment.generation),
        instruction_in_user_turn=out.instruction_in_user_turn,
        seed=run.experiment.seed, batch_size=plan.size, batch_size_requested=run.batch_size,
        batch_size_after_oom=out.size_after_oom if out.size_after_oom != plan.size else None,
        mode=run.mode, layers=plan.layers, engine=engine_identity(run.engine) or {"kind": "tl"},
        engine_peak_rss_mib=out.peak_mib,
    )  # fmt: skip


def _model_plan(run: RunSettings, longest: int, n_items: int, model: Model) -> Plan:
    """How the stage batches for the TransformerLens engine on ``model``."""
    capture = Capture.of(run.mode, run.experiment.hook, run.layers, model.cfg.n_layers)
    names = capture.while_generating
    return Plan(batch_size(run, model, longest, n_items, capture.layers), device_of(model), names,
                list(capture.layers) if names else None,
                (len(names), model.cfg.d_model) if names else None)  # fmt: skip


def _peak_mib(engine: Engine) -> float | None:
    """A vLLM server's peak memory (this process's is the stage's usual measure)."""
    peak = getattr(getattr(engine, "client", None), "peak_rss", None)
    return round(peak / 2**20, 1) if peak else None


def read_responses(run: RunSettings, key: str) -> Dataset:
    """The finished stage's dataset, checked against its meta.json (and the pooled activations
    of combined mode, which the next stage reads)."""
    stage = run.stage_dir("responses")
    responses = load_from_disk(str(stage / "dataset"))
    expected = sum(read_json(stage / META)["counts"].values())
    if len(responses) != expected:
        raise ValueError(f"{len(responses)} responses, meta.json says {expected}")
    if run.mode == "combined":
        load_tensors(stage / POOLED)
    return responses


RESPONSES: Stage[Dataset] = Stage(
    "responses", (), "dataset/ (+ pooled.pt in combined mode)",
    key=responses_key, compute=compute_responses, save=save_responses, load=read_responses,
)  # fmt: skip


def generate_responses(run: RunSettings, get_model: GetModel) -> Dataset:
    """Run the responses stage alone (or read it back when up to date)."""
    return run_stage(RESPONSES, run, get_model)


def load_responses(run: RunSettings) -> tuple[Dataset, str]:
    """The up-to-date responses and their key."""
    return need(RESPONSES, run), responses_key(run)


def load_pooled(run: RunSettings) -> tuple[dict[tuple[str, int], Tensor], tuple[int, ...]]:
    """Combined mode: the activations recorded while generating, per (polarity, index), and
    the layers they were recorded at."""
    load_responses(run)
    path = run.stage_dir("responses") / POOLED
    if not path.exists():  # combined runs of tlextract before 0.2 wrote activations directly
        raise TLExtractError(
            f"{path}: missing; these responses were generated by an older tlextract. Delete "
            f"{path.parent} and run again to regenerate them."
        )
    return load_tensors(path), tuple(read_json(path.parent / META)["layers"])
