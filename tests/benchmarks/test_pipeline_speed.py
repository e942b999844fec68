"""The original project's speed table, reproduced on the embedded default model.

Workload (its shape): pos + neg examples of one trait of the default experiment, sampled with
the experiment's settings and a fixed new-token budget, through the real pipeline (generate,
judge none, activations, vectors, with every file written), from a fresh output directory per
configuration. Configurations: serial (batch 1) and batched at 4, 8 and 16, each two-stage and
combined. Reported per configuration, all measured in one run: wall time, generated tokens/s,
speedup over serial two-stage, and peak memory beyond the loaded model
(:class:`tlextract.memory.PeakMemory`). Then, on the first 16 prompts of the workload with greedy
decoding and exactly ``N_NEW`` tokens each: tlextract's batched generation with activation
capture on every layer against transformers' own ``generate`` (best of ``ROUNDS``, interleaved).

``make bench`` runs it; the table is printed and written to ``docs/benchmarks/pipeline.md``,
which the README quotes. ``TLEXTRACT_BENCH_N`` (examples per polarity, default 16) and
``TLEXTRACT_BENCH_NEW`` (new tokens, default 32) size it. No timing is asserted.
"""

from __future__ import annotations

import os
import platform
import shutil
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tlextract.activations import hook_name
from tlextract.generation import generate_batch, left_pad, tokenize
from tlextract.memory import PeakMemory
from tlextract.models import DEFAULT_MODEL, load_hf_model, load_model
from tlextract.pipeline import run_trait, settings_for
from tlextract.store import read_json, write_text
from tlextract.traits import GenerationSettings, build_examples, experiments_root, load_experiment

pytestmark = [pytest.mark.bench, pytest.mark.slow]

EXPERIMENT, TRAIT = "smollm2_cognitive", "local_global"
N = int(os.environ.get("TLEXTRACT_BENCH_N", "16"))
N_NEW = int(os.environ.get("TLEXTRACT_BENCH_NEW", "32"))
ROUNDS = 2
CONFIGS = [(b, mode) for b in (1, 4, 8, 16) for mode in ("two-stage", "combined")]
OUT = Path(__file__).resolve().parents[2] / "docs" / "benchmarks" / "pipeline.md"
MiB = 2**20


def _machine() -> str:
    cpu = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line),
        platform.processor() or "unknown CPU",
    )
    return f"{os.cpu_count()} x {cpu}, torch {torch.__version__}, {torch.get_num_threads()} threads"


def _experiment(root: Path):
    """The default experiment copied to ``root``, with the benchmark's new-token budget."""
    shutil.copytree(
        experiments_root() / EXPERIMENT,
        root / EXPERIMENT,
        ignore=shutil.ignore_patterns("extraction*", "report*"),
    )
    exp = load_experiment(EXPERIMENT, root)
    return replace(exp, generation=replace(exp.generation, max_new_tokens=N_NEW))


def _pipeline_rows(tmp_path: Path, model) -> list[dict]:
    rows = []
    for batch, mode in CONFIGS:
        exp = _experiment(tmp_path / f"{mode}-{batch}")
        run = settings_for(exp, TRAIT, n_examples=N, batch_size=batch, mode=mode, judge="none")
        with PeakMemory(model.cfg.device) as mem:
            start = time.perf_counter()
            run_trait(run, get_model=lambda: model)
            wall = time.perf_counter() - start
        tokens = read_json(run.stage_dir("generate") / "meta.json")["n_generated_tokens"]
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


def _versus_transformers(model, tmp_path: Path) -> dict[str, float]:
    exp = _experiment(tmp_path / "hf")
    examples = build_examples(exp.trait(TRAIT), 8, model.tokenizer, exp.prompt_style)
    ids = tokenize(model, [e.prompt for e in examples], exp.prompt_style)[:16]
    hf_model, hf_tok = load_hf_model(DEFAULT_MODEL)
    tokens, mask = left_pad(ids, hf_tok.pad_token_id, "cpu")
    capture = [hook_name("resid_post", layer) for layer in range(model.cfg.n_layers)]
    greedy = GenerationSettings(max_new_tokens=N_NEW, do_sample=False)

    def ours() -> int:
        gens = generate_batch(model, ids, greedy, seeds=[0] * len(ids), capture=capture)
        return sum(len(g.response_ids) + g.stopped for g in gens)

    def hf() -> int:
        with torch.inference_mode():
            out = hf_model.generate(
                input_ids=tokens,
                attention_mask=mask,
                max_new_tokens=N_NEW,
                min_new_tokens=N_NEW,
                do_sample=False,
                pad_token_id=hf_tok.pad_token_id,
            )
        return (out.shape[1] - tokens.shape[1]) * out.shape[0]

    best = {"tlextract (capture on)": 0.0, "transformers generate": 0.0}
    for _ in range(ROUNDS):
        for name, fn in zip(best, (ours, hf), strict=True):
            start = time.perf_counter()
            n = fn()
            best[name] = max(best[name], n / (time.perf_counter() - start))
    return best


def _table(
    rows: list[dict], versus: dict[str, float], load: tuple[float, float], n_layers: int
) -> str:
    base = next(r for r in rows if r["batch"] == 1 and r["mode"] == "two-stage")["wall_s"]
    lines = [
        f"Machine: {_machine()}; load average {load[0]:.2f} before, {load[1]:.2f} after.",
        f"Workload: `{EXPERIMENT}/{TRAIT}`, {N} pos + {N} neg examples, sampled, at most "
        f"{N_NEW} new tokens each, all {n_layers} layers, model {DEFAULT_MODEL} "
        "(float32, accelerated).",
        "",
        "| batch | mode | wall s | generated tokens | tokens/s | speedup vs serial two-stage "
        "| peak memory beyond the model (MiB) |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['batch']} | {r['mode']} | {r['wall_s']:.1f} | {r['tokens']} | {r['tok_s']:.1f} "
        f"| {base / r['wall_s']:.2f}x | {r['peak_mib']:.0f} |"
        for r in rows
    ]
    hf = versus["transformers generate"]
    lines += [
        "",
        f"Batch 16, greedy, exactly {N_NEW} new tokens per prompt, best of {ROUNDS}:",
        "",
        "| generator | tokens/s | ratio to transformers |",
        "|---|---:|---:|",
        *(f"| {name} | {rate:.1f} | {rate / hf:.2f} |" for name, rate in versus.items()),
    ]
    return "\n".join(lines) + "\n"


def test_pipeline_speed_table(benchmark, tmp_path: Path, capsys) -> None:
    model = load_model(DEFAULT_MODEL)
    warm = _experiment(tmp_path / "warmup")  # first-call allocations and lazy imports
    run_trait(
        settings_for(warm, TRAIT, n_examples=1, batch_size=1, judge="none"), get_model=lambda: model
    )
    load_before = os.getloadavg()[0]
    result: dict = {}

    def measure() -> None:
        result["rows"] = _pipeline_rows(tmp_path, model)
        result["versus"] = _versus_transformers(model, tmp_path)

    benchmark.pedantic(measure, rounds=1, iterations=1)
    table = _table(
        result["rows"], result["versus"], (load_before, os.getloadavg()[0]), model.cfg.n_layers
    )
    benchmark.extra_info.update(
        {"rows": result["rows"], "versus": result["versus"], "machine": _machine()}
    )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    write_text(OUT, "# Pipeline speed (`make bench`)\n\n" + table)
    with capsys.disabled():
        print("\n" + table)
