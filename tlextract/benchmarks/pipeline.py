"""Speed benchmarks: the question a user asks, and the original project's table.

1. **tlextract against transformers.** At each batch size, greedy decoding of the same chat
   prompts for a fixed number of new tokens: tlextract's ``generate_batch`` on the model
   ``load_model`` returns, recording every layer's residual stream (what the pipeline's combined
   mode does), against transformers' own ``generate`` on the same weights (no hooks at all).
   A second tlextract row switches off the shared-prompt-prefix computation, to show what part
   of the gain is that. Tokens/s, the ratio to transformers, the time of one decode step, and the
   fraction of the decode-step floor reached (below).
2. **The pipeline table.** The real pipeline (generate, judge none, activations, vectors, every
   file written) on one trait of an experiment, serial and batched, two-stage and combined: wall
   time, tokens/s, speedup over serial two-stage, peak memory beyond the loaded model.

The **decode-step floor** of a batch of ``b`` rows: every weight of the matrix products (blocks
and unembedding) must be read once, and ``2 * weights * b`` FLOPs done; at the memory bandwidth
and matrix-product throughput measured on this machine in the same run (a large sum, a large
product), a step cannot take less than the larger of the two. It leaves out attention and
element-wise work, so it is a lower bound; the fraction says how close a contender comes.

A decode step's time is ``(t(n) - t(1)) / (n - 1)`` from generations of ``n`` and of 1 new
token (which both include the prompt pass). All contenders are interleaved round by round and
each keeps its best round, so load on a shared machine hits all alike. Nothing here asserts a
speed: ``make bench`` and ``make bench-gpu`` run :func:`run_benchmark` through pytest-benchmark
(``tests/benchmarks``) and write a Markdown report.
"""

from __future__ import annotations

import os
import platform
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from transformer_lens import HookedTransformer

from tlextract.benchmarks import engine_speed
from tlextract.benchmarks.roofline import Roofline, measure_roofline, product_weights, sync
from tlextract.benchmarks.tables import BenchPlan, header, render
from tlextract.config import GenerationSettings, experiments_root, load_experiment
from tlextract.errors import TLExtractError
from tlextract.model.load import load_hf_model, load_model
from tlextract.model.memory import PeakMemory
from tlextract.model.tokens import device_of, left_pad, tokenize
from tlextract.ops.generate import generate_batch
from tlextract.ops.pool import hook_name
from tlextract.settings import MODES, settings_for
from tlextract.stages.common import first_line
from tlextract.stages.run import release, run_trait
from tlextract.store import read_json, write_text
from tlextract.traits import build_examples

MiB = 2**20


@dataclass(frozen=True)
class Workload:
    """One trait of one experiment (its model, prompt style and generation settings)."""

    experiment: str
    trait: str


def _workload_prompts(model: HookedTransformer, workload: Workload, root: Path, n: int) -> list:
    exp = load_experiment(workload.experiment, root)
    examples = build_examples(
        exp.trait(workload.trait), n, model.tokenizer, exp.prompt_style, exp.variant
    )
    return tokenize(model, [e.prompt for e in examples], exp.prompt_style)


def versus_transformers(
    model: HookedTransformer,
    prompt_ids: Sequence[Sequence[int]],
    batch_sizes: Sequence[int],
    n_new: int,
    rounds: int,
    roof: Roofline,
) -> list[dict]:
    """Rows of table 1 (see the module docstring) for each batch size."""
    device = torch.device(device_of(model))
    hf_model, hf_tok = load_hf_model(model.cfg.model_name, str(model.cfg.dtype).split(".")[-1])
    hf_model = hf_model.to(device)  # type: ignore[arg-type]
    weights, itemsize = product_weights(model), model.cfg.dtype.itemsize
    rows = []
    for batch in batch_sizes:
        ids = [prompt_ids[i % len(prompt_ids)] for i in range(batch)]
        contenders = _contenders(model, hf_model, hf_tok.pad_token_id, ids)
        for run in contenders.values():  # warm-up: allocations, packing, lazy imports
            run(2)
        best: dict[str, dict[int, float]] = {name: {} for name in contenders}
        produced: dict[str, int] = {}
        for _ in range(rounds):
            for name, run in contenders.items():
                for n in (1, n_new):
                    sync(device)
                    start = time.perf_counter()
                    count = run(n)
                    sync(device)
                    seconds = time.perf_counter() - start
                    best[name][n] = min(best[name].get(n, float("inf")), seconds)
                    if n == n_new:
                        produced[name] = count
        floor = roof.decode_step(weights, itemsize, batch)
        hf_rate = produced[HF] / best[HF][n_new]
        for name, times in best.items():
            step = (times[n_new] - times[1]) / (n_new - 1)
            # Timing noise can outweigh a few cheap steps (the tiny test model): no figure then.
            step_ms = step * 1e3 if step > 0 else None
            rate = produced[name] / times[n_new]
            rows.append({
                "batch": batch, "contender": name, "tokens": produced[name],
                "tok_s": rate, "ratio": rate / hf_rate, "step_ms": step_ms,
                "floor_ms": floor * 1e3, "floor_fraction": floor / step if step > 0 else None,
            })  # fmt: skip
    return rows


OURS = "tlextract, capture on every layer"
HF = "transformers generate, no hooks"


def _contenders(
    model: HookedTransformer, hf_model: Any, pad_id: int, ids: list[Sequence[int]]
) -> dict[str, Callable[[int], int]]:
    """Each generates ``n`` new tokens for the prompts and returns how many it produced."""
    capture = [hook_name("resid_post", layer) for layer in range(model.cfg.n_layers)]
    tokens, mask = left_pad(ids, pad_id, device_of(model))

    def ours(n: int, share: bool = True) -> int:
        greedy = GenerationSettings(max_new_tokens=n, do_sample=False)
        gens = generate_batch(
            model, ids, greedy, [0] * len(ids), capture=capture, share_prefix=share
        )
        return sum(len(g.response_ids) + g.stopped for g in gens)

    def hf(n: int) -> int:
        with torch.inference_mode():
            out = hf_model.generate(
                input_ids=tokens,
                attention_mask=mask,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=pad_id,
            )
        return (out.shape[1] - tokens.shape[1]) * out.shape[0]

    if len(ids) == 1:  # nothing to share
        return {OURS: ours, HF: hf}
    return {OURS: ours, f"{OURS}, prompt prefix not shared": lambda n: ours(n, share=False), HF: hf}


def pipeline_rows(
    model: HookedTransformer,
    workload: Workload,
    root: Path,
    n_examples: int,
    n_new: int,
    batch_sizes: Sequence[int],
) -> list[dict]:
    """Rows of table 2: each configuration from a fresh output directory."""
    rows = []
    device = device_of(model)
    for batch in batch_sizes:
        for mode in MODES:
            exp_root = root / f"{workload.experiment}-{mode}-{batch}"
            exp = _copy_experiments(exp_root, workload.experiment, n_new)
            run = settings_for(
                exp,
                workload.trait,
                n_examples=n_examples,
                batch_size=batch,
                mode=mode,
                judge="none",
            )
            with PeakMemory(device) as mem:
                start = time.perf_counter()
                run_trait(run, get_model=lambda: model)
                wall = time.perf_counter() - start
            tokens = read_json(run.stage_dir("responses") / "meta.json")["n_generated_tokens"]
            rows.append(
                {
                    "batch": batch,
                    "mode": mode,
                    "wall_s": wall,
                    "tokens": tokens,
                    "tok_s": tokens / wall,
                    "peak_mib": mem.peak / MiB,
                }
            )
    return rows


def _copy_experiments(root: Path, name: str, n_new: int):
    """The shipped experiments (definitions only) under ``root``, so outputs land there; the
    named one with the benchmark's new-token budget."""
    if not root.exists():
        shutil.copytree(
            experiments_root(),
            root,
            ignore=shutil.ignore_patterns("extraction*", "report*", "*.ipynb"),
        )
    exp = load_experiment(name, root)
    return replace(exp, generation=replace(exp.generation, max_new_tokens=n_new))


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    if Path("/proc/cpuinfo").exists():
        with open("/proc/cpuinfo") as f:
            cpu = next((x.split(":", 1)[1].strip() for x in f if "model name" in x), cpu)
    text = f"{os.cpu_count()} x {cpu}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    if torch.cuda.is_available():
        text += f", GPU {torch.cuda.get_device_name()}"
    return text


@dataclass(frozen=True)
class Measures:
    """What a benchmark run measures with; each returns the rows of one table, which the report
    is built from. The defaults measure; tests pass stand-ins that return rows at once."""

    roofline: Callable[..., Roofline] = measure_roofline
    versus: Callable[..., list[dict]] = versus_transformers
    pipeline: Callable[..., list[dict]] = pipeline_rows
    vllm: Callable[..., dict] = engine_speed.measure


def run_benchmark(
    workloads: Sequence[Workload],
    plan: BenchPlan,
    work_dir: Path,
    out: Path,
    title: str,
    measures: Measures = Measures(),
) -> dict:
    """Both tables for each workload, written to ``out`` (Markdown) table by table as each is
    measured, so a later failure loses none of them; returns the raw rows."""
    load_before = os.getloadavg()[0]
    roof = measures.roofline(plan.device, getattr(torch, plan.dtype))
    results: dict = {"machine": machine(), "roofline": roof.__dict__, "workloads": []}
    loads = f"load average {load_before:.2f} before"
    out.parent.mkdir(parents=True, exist_ok=True)

    def write() -> None:
        sections = [render(m, plan) for m in results["workloads"]]
        write_text(out, "\n".join(header(title, results["machine"], plan, roof, loads) + sections))

    for workload in workloads:
        results["workloads"].append({"workload": workload.__dict__})
        _measure_workload(workload, plan, roof, work_dir, results["workloads"][-1], write, measures)
    loads += f", {os.getloadavg()[0]:.2f} after"
    write()
    return results


def _measure_workload(
    workload: Workload,
    plan: BenchPlan,
    roof: Roofline,
    work_dir: Path,
    measured: dict,
    written: Callable[[], None],
    measures: Measures,
) -> None:
    """Both tables for one workload into ``measured``, calling ``written`` after each (its
    model is freed when this returns). A vLLM that cannot run leaves its reason instead of its
    rows."""
    root = work_dir / workload.experiment
    exp = _copy_experiments(root / "prompts", workload.experiment, plan.n_new)
    # The accelerated HookedTransformer is what these tables measure.
    model = load_model(exp.model, device=plan.device, dtype=plan.dtype, backend="hooked")
    assert isinstance(model, HookedTransformer)
    prompts = _workload_prompts(model, workload, root / "prompts", max(plan.versus_batch_sizes))
    # Warm-up run: first-call allocations, packed weights, lazy imports.
    warm = _copy_experiments(root / "warmup", workload.experiment, plan.n_new)
    run_trait(
        settings_for(warm, workload.trait, n_examples=1, batch_size=1, judge="none"),
        get_model=lambda: model,
    )
    measured["model"] = exp.model
    measured["versus"] = measures.versus(
        model, prompts, plan.versus_batch_sizes, plan.n_new, plan.rounds, roof
    )
    written()
    measured["pipeline"] = measures.pipeline(
        model, workload, root, plan.n_examples, plan.n_new, plan.batch_sizes
    )
    written()
    if not plan.vllm:
        return

    def experiment_for(batch: int):
        return _copy_experiments(root / f"{workload.experiment}-vllm-{batch}",
                                 workload.experiment, plan.n_new)  # fmt: skip

    release()  # memory PyTorch keeps reserved: vLLM asks for a share of the free memory
    try:
        measured["vllm"] = measures.vllm(
            model, plan.dtype, prompts, plan.n_new, plan.versus_batch_sizes,
            (experiment_for, workload.trait, plan.n_examples, plan.batch_sizes),
            root / "vllm-server.log", plan.rounds)  # fmt: skip
    except TLExtractError as e:  # no vLLM here, or it cannot start: the other tables stand
        measured["vllm_missing"] = first_line(e)
    written()


DEFAULT_WORKLOAD = Workload("smollm2_cognitive", "local_global")
GEMMA_WORKLOAD = Workload("gemma3_270m_cognitive", "local_global")


def cpu_benchmark(out: Path, work_dir: Path, n_examples: int = 32, n_new: int = 32) -> dict:
    """``make bench``: the default model in float32 on the CPU, batch 1 to 16."""
    plan = BenchPlan("cpu", "float32", n_examples, n_new, (1, 4, 8, 16), (1, 8, 16), rounds=3,
                     vllm=True)  # fmt: skip
    return run_benchmark([DEFAULT_WORKLOAD], plan, work_dir, out, "Speed on the CPU (`make bench`)")


def gpu_benchmark(
    out: Path,
    work_dir: Path,
    *,
    workloads: Sequence[Workload] = (DEFAULT_WORKLOAD, GEMMA_WORKLOAD),
    device: str = "cuda",
    dtype: str = "bfloat16",
    n_examples: int = 100,
    n_new: int = 32,
    batch_sizes: Sequence[int] = (1, 4, 8, 16, 32, 64),
    rounds: int = 2,
    vllm: bool = True,
    measures: Measures = Measures(),
) -> dict:
    """``make bench-gpu``: the original study's workload shape (200 examples, 100 per polarity)
    on both embedded models in bfloat16, batch 1 to 64. A test runs it on the CPU with the tiny
    model and small sizes, so it keeps working between GPU runs."""
    sizes = tuple(batch_sizes)
    plan = BenchPlan(device, dtype, n_examples, n_new, sizes, sizes, rounds, vllm)
    title = f"Speed on {device} (`make bench-gpu`)"
    return run_benchmark(workloads, plan, work_dir, out, title, measures)
