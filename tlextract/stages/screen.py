"""The model's own responses to a screened dataset's prompts, as a stage: keyed by the prompts,
the model, its dtype and backend, the generation settings, the seed and the prompt style;
generated in batches saved as shards (an interrupted run resumes), read back and checked (a
damaged output is redone). One generation serves every trait: the responses do not depend on
the trait. The projection differences themselves are :mod:`tlextract.stages.screening`'s."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from tlextract.model.source import backend_of
from tlextract.screen_data import Sample
from tlextract.settings import RunSettings, pick_device, screen_dir
from tlextract.stages.common import batch_size
from tlextract.stages.screening import own_responses, sample_ids
from tlextract.stages.stage import GetModel, Job, Stage, run_stage
from tlextract.store import derive_seed, fingerprint, read_json, write_json

log = logging.getLogger(__name__)
OWN = "own_responses.json"


def seeds_of(run: RunSettings, n: int) -> list[int]:
    return [derive_seed(run.experiment.seed, "screen", i) for i in range(n)]


def own_stage(samples: Sequence[Sample], data: str, layers: Sequence[int]) -> Stage[list]:
    """The stage generating the model's own response to each sample's prompt, in
    ``screen_dir(run, data)/responses``; ``layers``: those the auto batch size is sized for."""

    def key(run: RunSettings) -> str:
        exp = run.experiment
        device = torch.device(pick_device(run.device)).type
        return fingerprint({
            "prompts": [s.messages for s in samples], "model": run.model, "dtype": run.dtype,
            "backend": backend_of(run.model, run.model_backend), "device": device,
            "generation": asdict(exp.generation), "seed": exp.seed,
            "prompt_style": exp.prompt_style,
        })  # fmt: skip

    def compute(job: Job) -> list[list[int]]:
        run, model = job.run, job.get_model()
        prompts, _ = sample_ids(model, samples, run.experiment.prompt_style)
        gen = run.experiment.generation
        longest = max(map(len, prompts)) + gen.max_new_tokens
        size = batch_size(run, model, longest, len(prompts), layers)
        return own_responses(model, prompts, gen, seeds_of(run, len(prompts)), size,
                             job.sharded)  # fmt: skip

    def save(job: Job, own: list[list[int]]) -> dict[str, Any]:
        write_json(job.dir / OWN, own)
        n_empty = sum(not ids for ids in own)
        log.info("[screen] own responses: %d (%d empty) -> %s", len(own), n_empty, job.dir)
        return {"n_samples": len(own), "n_empty": n_empty, "data": data,
                "generation": asdict(job.run.experiment.generation),
                "prompt_style": job.run.experiment.prompt_style}  # fmt: skip

    def load(run: RunSettings, key: str) -> list[list[int]]:
        own = read_json(folder(run, "responses") / OWN)
        ok = isinstance(own, list) and len(own) == len(samples)
        if not ok or not all(isinstance(r, list) and all(type(t) is int for t in r) for r in own):
            raise ValueError(f"{OWN}: not {len(samples)} lists of token ids")
        return own

    def folder(run: RunSettings, name: str) -> Path:
        return screen_dir(run, data) / name

    return Stage("responses", (), OWN, key=key, compute=compute, save=save, load=load,
                 folder=folder)  # fmt: skip


def generate_own(
    run: RunSettings, get_model: GetModel, samples: Sequence[Sample], data: str,
    layers: Sequence[int],
) -> list[list[int]]:  # fmt: skip
    """The model's own responses (token ids), read back when up to date."""
    return run_stage(own_stage(samples, data, layers), run, get_model)
