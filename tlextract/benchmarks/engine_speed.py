"""The engines side by side in one benchmark run (``make bench``, ``make bench-gpu``).

1. **vLLM generation alone**: one server started for both tables (its start-up time reported
   once), then greedy generation of the workload's prompts at each batch size (that many
   requests in flight), timed from the first request to the last answer: what vLLM itself
   delivers, no activations.
2. **The pipeline with engine=vllm**, next to the pipeline table's engine=tl rows, on that
   server (a run's own server adds the start-up once per generate stage): generate, judge none, the
   teacher-forced TransformerLens pass over every layer, vectors; wall time, generated
   tokens/s, and peak memory of this process and of the vLLM server.

Nothing here asserts a speed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

from tlextract.config import EngineSettings, Experiment, GenerationSettings
from tlextract.engines.vllm import VLLMEngine, max_model_len, vllm_engine
from tlextract.model.decoding import Model
from tlextract.model.load import load_tokenizer
from tlextract.model.memory import PeakMemory
from tlextract.model.tokens import device_of
from tlextract.settings import settings_for
from tlextract.stages.run import run_trait
from tlextract.store import read_json

MiB = 2**20


def measure(
    model: Model,
    dtype: str,
    prompt_ids: Sequence[Sequence[int]],
    n_new: int,
    versus_sizes: Sequence[int],
    pipeline: tuple[Callable[[int], Experiment], str, int, Sequence[int]],
    log_path: Path,
    rounds: int = 2,
    engine: EngineSettings | None = None,
) -> dict:
    """Both tables on one vLLM server (started here unless ``engine.base_url`` names one):
    ``pipeline`` is (experiment_for, trait, n_examples, batch sizes) for table 2."""
    name = model.cfg.model_name
    longest = max(map(len, prompt_ids)) + n_new
    start = time.perf_counter()
    with vllm_engine(engine or EngineSettings(kind="vllm"), name, dtype, load_tokenizer(name),
                     max_model_len(longest), log_path) as vllm:  # fmt: skip
        startup = time.perf_counter() - start
        alone = vllm_alone_rows(vllm, prompt_ids, versus_sizes, n_new, rounds)
        experiment_for, trait, n_examples, sizes = pipeline
        url = vllm.client.root + "/v1"
        rows = vllm_pipeline_rows(experiment_for, trait, n_examples, sizes, model, url)
    peak = vllm.client.peak_rss  # set as the server stops; None for one already running
    return {"startup_s": startup, "alone": alone, "pipeline": rows,
            "server_peak_mib": peak / MiB if peak else None}  # fmt: skip


def vllm_alone_rows(
    engine: VLLMEngine,
    prompt_ids: Sequence[Sequence[int]],
    batch_sizes: Sequence[int],
    n_new: int,
    rounds: int = 2,
) -> list[dict]:
    """Table 1: [{batch, tokens, tok_s}] (best of ``rounds``)."""
    greedy = GenerationSettings(max_new_tokens=n_new, do_sample=False)
    engine.generate(prompt_ids[:2], greedy, [0, 1])  # warm-up
    rows = []
    for batch in batch_sizes:
        ids = [prompt_ids[i % len(prompt_ids)] for i in range(batch)]
        best, tokens = float("inf"), 0
        for _ in range(rounds):
            t = time.perf_counter()
            gens = engine.generate(ids, greedy, list(range(batch)))
            best = min(best, time.perf_counter() - t)
            tokens = sum(len(g.response_ids) + g.stopped for g in gens)
        rows.append({"batch": batch, "tokens": tokens, "tok_s": tokens / best})
    return rows


def vllm_pipeline_rows(
    experiment_for: Callable[[int], Experiment],
    trait: str,
    n_examples: int,
    batch_sizes: Sequence[int],
    model: Model,
    vllm_url: str | None = None,
) -> list[dict]:
    """Table 2's engine=vllm rows; ``experiment_for(batch)`` gives each a fresh output
    directory; ``model`` is the loaded TransformerLens model the activations pass uses; a
    server is started for each run unless ``vllm_url`` names one."""
    rows = []
    for batch in batch_sizes:
        run = settings_for(experiment_for(batch), trait, n_examples=n_examples, batch_size=batch,
                           judge="none", engine="vllm", vllm_url=vllm_url)  # fmt: skip
        with PeakMemory(device_of(model)) as mem:
            start = time.perf_counter()
            run_trait(run, get_model=lambda: model)
            wall = time.perf_counter() - start
        meta = read_json(run.stage_dir("responses") / "meta.json")
        tokens = meta["n_generated_tokens"]
        rows.append({"batch": batch, "mode": "two-stage", "engine": "vllm", "wall_s": wall,
                     "tokens": tokens, "tok_s": tokens / wall,
                     "peak_mib": mem.peak / MiB})  # fmt: skip
    return rows


def render(measured: dict, base_wall: float) -> list[str]:
    """Markdown for both tables; ``base_wall`` is serial two-stage engine=tl's wall time."""
    alone, pipeline = measured["alone"], measured["pipeline"]
    lines = [
        "",
        f"vLLM generation alone (greedy, requests in flight = batch), on a server started once "
        f"for both tables ({measured['startup_s']:.0f} s to start, not counted below; a run that "
        "starts its own server pays it once per generate stage):",
        "",
        "| batch | generated tokens | tokens/s |",
        "|---:|---:|---:|",
    ]
    lines += [f"| {r['batch']} | {r['tokens']} | {r['tok_s']:.1f} |" for r in alone]
    lines += [
        "",
        "Pipeline with engine=vllm on that server (same examples and settings as the pipeline "
        "table above; the idle server busy-waits on a core during the TransformerLens pass, "
        "which a run's own server, stopped after generation, does not; the server's own peak "
        f"memory over both tables: {_mib(measured.get('server_peak_mib'))} MiB):",
        "",
        "| batch | engine | wall s | generated tokens | tokens/s | speedup vs serial two-stage tl "
        "| peak memory beyond the model (MiB) |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['batch']} | vllm | {r['wall_s']:.1f} | {r['tokens']} | {r['tok_s']:.1f} "
        f"| {base_wall / r['wall_s']:.2f}x | {r['peak_mib']:.0f} |"
        for r in pipeline
    ]
    return lines


def _mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"
