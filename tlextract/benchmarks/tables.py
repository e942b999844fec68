"""The benchmark report's tables, built from the rows :mod:`tlextract.benchmarks.pipeline`
measured (rows in, Markdown out: nothing measured here)."""

from __future__ import annotations

from dataclasses import dataclass

from tlextract.benchmarks import engine_speed
from tlextract.benchmarks.roofline import Roofline


@dataclass(frozen=True)
class BenchPlan:
    device: str
    dtype: str
    n_examples: int  # per polarity, in the pipeline table
    n_new: int
    batch_sizes: tuple[int, ...]  # pipeline table
    versus_batch_sizes: tuple[int, ...]  # tlextract vs transformers
    rounds: int
    vllm: bool = False  # also the engine=vllm tables (benchmarks/engine_speed.py)


def header(title: str, machine: str, plan: BenchPlan, roof: Roofline, loads: str) -> list[str]:
    return [
        f"# {title}", "",
        f"Machine: {machine}; {plan.dtype}; {loads}.",
        f"Measured here in the same run: memory read bandwidth {roof.bandwidth / 1e9:.1f} GB/s "
        f"(a large sum), matrix products {roof.flops / 1e9:.0f} GFLOP/s (a large product).",
        "",
        "Produced by `tlextract.benchmarks.pipeline.run_benchmark`; its docstring has the method.",
        "",
    ]  # fmt: skip


def _num(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def _serial_wall(pipeline: list[dict]) -> float:
    return next(r["wall_s"] for r in pipeline if r["batch"] == 1 and r["mode"] == "two-stage")


def render(measured: dict, plan: BenchPlan) -> str:
    """The tables measured so far for one workload."""
    if "versus" not in measured:
        return ""
    workload = measured["workload"]
    lines = [
        f"## {measured['model']}: `{workload['experiment']}/{workload['trait']}`", "",
        f"Greedy, {plan.n_new} new tokens per prompt, the trait's prompts, best of {plan.rounds} "
        "rounds:",
        "",
        "| batch | generator | tokens/s | vs transformers | decode step ms | floor ms "
        "| fraction of floor |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    lines += [
        f"| {r['batch']} | {r['contender']} | {r['tok_s']:.1f} | {r['ratio']:.2f}x "
        f"| {_num(r['step_ms'], '.3g')} | {r['floor_ms']:.3g} "
        f"| {_num(r['floor_fraction'], '.2f')} |"
        for r in measured["versus"]
    ]
    if "pipeline" in measured:
        lines += _pipeline_lines(measured["pipeline"], plan)
    if "vllm" in measured:
        lines += engine_speed.render(measured["vllm"], _serial_wall(measured["pipeline"]))
    if "vllm_missing" in measured:
        lines += ["", f"No engine=vllm rows: vLLM did not run here ({measured['vllm_missing']})."]
    return "\n".join(lines) + "\n"


def _pipeline_lines(pipeline: list[dict], plan: BenchPlan) -> list[str]:
    base = _serial_wall(pipeline)
    lines = [
        "",
        f"Pipeline: {plan.n_examples} pos + {plan.n_examples} neg examples, sampled with the "
        f"experiment's settings, at most {plan.n_new} new tokens, all layers, every file written:",
        "",
        "| batch | mode | wall s | generated tokens | tokens/s | speedup vs serial two-stage "
        "| peak memory beyond the model (MiB) |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    return lines + [
        f"| {r['batch']} | {r['mode']} | {r['wall_s']:.1f} | {r['tokens']} | {r['tok_s']:.1f} "
        f"| {base / r['wall_s']:.2f}x | {r['peak_mib']:.0f} |"
        for r in pipeline
    ]
