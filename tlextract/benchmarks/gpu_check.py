"""The prepared GPU check (``make gpu-check``): equality with transformers, then speed.

For each model of :mod:`tlextract.benchmarks.gpu_models` (random weights at real shapes) and dtype:

1. **Equality** against transformers on the same weights, within the dtype's tolerance
   (``TOL``). Logits: tlextract's model teacher-forced on transformers' greedy tokens against
   the logits transformers chose them from. Greedy tokens: tlextract's ``generate_batch``
   against transformers' ``generate``, row by row up to the first near-tie, a step whose top-2
   margin is not above twice the two models' largest logit difference there (random weights
   give many; either token is right there and the rows then part). Residuals: every block's
   output pooled over the response tokens, by tlextract's capture during generation and by
   ``pooled_activations`` (teacher-forced), against transformers' decoder-layer outputs
   teacher-forced on the same tokens (relative L2 error, per row and layer).
2. **Speed** (bfloat16 only by default): tokens/s generating ``new_tokens`` forced tokens (no
   stop token exists) at each batch size for tlextract with capture on every layer, transformers
   ``generate``, and transformers ``generate`` with forward hooks on every decoder layer pooling
   the same residuals.

Each table is written to the Markdown report as soon as it is measured, so a crash or a timeout
keeps what was measured. Exit status 1 when an equality check failed or a model could not be
checked. Run as ``python -m tlextract.benchmarks.gpu_check`` (``--help``); ``--tiny`` runs the same
code at a few thousand parameters (the test suite does, on the CPU).
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from tlextract.benchmarks.gpu_models import CONFIGS, Pair, Shape, build_pair
from tlextract.benchmarks.pipeline import machine
from tlextract.benchmarks.roofline import sync
from tlextract.config import GenerationSettings
from tlextract.model.accel import is_accelerated
from tlextract.model.tokens import left_pad
from tlextract.ops.generate import generate_batch
from tlextract.ops.pool import hook_name, masked_mean, pack, pooled_activations
from tlextract.store import write_text

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
# Largest relative error against transformers of a logit (to the step's largest |logit|) and of
# a pooled residual (L2, per row and layer). Two implementations round differently; bfloat16
# keeps 8 bits of mantissa (3.9e-3 per operation) through every layer, float32 24.
TOL = {"float32": 1e-3, "bfloat16": 5e-2}
# Qwen2.5-7B in float32 (30 GB per copy, two copies) is left out: bfloat16 is what users run.
MODEL_DTYPES = {
    "llama-3.2-1b": ("bfloat16", "float32"),
    "gemma-2-2b": ("bfloat16", "float32"),
    "qwen2.5-7b": ("bfloat16",),
}
OURS, HF, HF_HOOKS = (
    "tlextract, capture on every layer",
    "transformers generate",
    "transformers generate, hooks on every layer",
)


@dataclass(frozen=True)
class Plan:
    out: Path
    device: str
    shape: Shape = Shape()
    models: tuple[str, ...] = tuple(CONFIGS)
    batches: tuple[int, ...] = (1, 8, 32, 64)
    new_tokens: int = 128
    check_rows: int = 8  # prompts in the equality check
    check_tokens: int = 32  # greedy tokens compared
    time_dtypes: tuple[str, ...] = ("bfloat16",)
    seed: int = 0
    command: str = ""  # the options it was run with, for the report


@dataclass
class Report:
    """The Markdown report, rewritten whole after every table."""

    path: Path
    lines: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)
        write_text(self.path, "\n".join(self.lines) + "\n")


def prompts(n: int, vocab: int, seed: int) -> list[list[int]]:
    """``n`` prompts of 8 to 23 tokens (left padding is exercised) sharing a 6-token prefix, as
    chat prompts share their template's start; ids 1.. (0 is padding)."""
    gen = torch.Generator().manual_seed(seed)
    head = torch.randint(1, vocab, (6,), generator=gen).tolist()
    lengths = torch.randint(2, 18, (n,), generator=gen).tolist()
    return [head + torch.randint(1, vocab, (k,), generator=gen).tolist() for k in lengths]


def _greedy(n: int) -> GenerationSettings:
    return GenerationSettings(max_new_tokens=n, do_sample=False)


def _capture(pair: Pair) -> list[str]:
    return [hook_name("resid_post", layer) for layer in range(pair.tl.cfg.n_layers)]


@torch.inference_mode()
def hf_greedy(pair: Pair, ids: Sequence[Sequence[int]], n: int) -> tuple[Tensor, Tensor]:
    """transformers' greedy tokens [row, step] and the logits it chose them from
    [row, step, vocab] (float32, on the device)."""
    tokens, mask = left_pad(ids, pair.pad_id, pair.tl.cfg.device or "cpu")
    out = pair.hf.generate(
        input_ids=tokens, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
        do_sample=False, output_logits=True, return_dict_in_generate=True,
    )  # fmt: skip
    return out.sequences[:, tokens.shape[1] :].cpu(), torch.stack(out.logits, dim=1).float()


@torch.inference_mode()
def decided(
    pair: Pair, ids: Sequence[Sequence[int]], tokens: Tensor, logits: Tensor
) -> tuple[Tensor, float]:
    """Which greedy steps [row, step] both models must agree on, and the largest logit error
    relative to the step's largest |logit|. tlextract's model, teacher-forced on transformers'
    tokens, gives its own logits for each step; where transformers' top-2 margin exceeds twice
    the largest difference between the two, both argmaxes are the same token. Below that the
    step is a near-tie (random weights give many) and either token is right."""
    responses = tokens.tolist()
    packed, attn, _ = pack(ids, responses, pair.pad_id, pair.tl.cfg.device or "cpu")
    n = tokens.shape[1]
    # Step s is predicted at the position of its previous token: the last n + 1 positions.
    ours = pair.tl(packed, attention_mask=attn)[:, -n - 1 : -1].float()
    delta = (ours - logits).abs().amax(dim=-1)
    top = logits.topk(2, dim=-1).values
    err = float((delta / logits.abs().amax(dim=-1)).max())
    return ((top[..., 0] - top[..., 1]) > 2 * delta).cpu(), err


@torch.inference_mode()
def hf_pooled(
    pair: Pair, ids: Sequence[Sequence[int]], responses: Sequence[Sequence[int]]
) -> Float[Tensor, "batch layer d_model"]:
    """Every decoder layer's output pooled over the response tokens, teacher-forced, with
    positions from the attention mask as tlextract counts them."""
    tokens, attn, response = pack(ids, responses, pair.pad_id, pair.tl.cfg.device or "cpu")
    outs: list[Tensor] = []
    hooks = [
        layer.register_forward_hook(
            lambda _m, _i, o: outs.append(o[0] if isinstance(o, tuple) else o)
        )
        for layer in pair.hf.model.layers
    ]
    try:
        positions = (attn.cumsum(-1) - 1).clamp(min=0)
        pair.hf(input_ids=tokens, attention_mask=attn, position_ids=positions)
    finally:
        for h in hooks:
            h.remove()
    return masked_mean(torch.stack(outs, dim=1), response).cpu()


def _rel_err(a: Tensor, b: Tensor) -> float:
    """Largest relative L2 error over rows and layers of [row, layer, d_model] tensors."""
    return float(((a - b).norm(dim=-1) / b.norm(dim=-1).clamp_min(1e-12)).max())


def equality(pair: Pair, dtype: str, plan: Plan) -> dict[str, Any]:
    """One row of the equality table (see the module docstring)."""
    ids = prompts(plan.check_rows, pair.vocab, plan.seed)
    theirs, logits = hf_greedy(pair, ids, plan.check_tokens)
    sure, logit_err = decided(pair, ids, theirs, logits)
    del logits
    gens = generate_batch(
        pair.tl, ids, _greedy(plan.check_tokens), [0] * len(ids), capture=_capture(pair)
    )
    ours = torch.tensor([g.response_ids for g in gens])
    n = plan.check_tokens
    ties = ~sure
    first_tie = torch.where(ties.any(1), ties.float().argmax(1), torch.full((len(ids),), n))
    differ = ours != theirs
    first_diff = torch.where(differ.any(1), differ.float().argmax(1), torch.full((len(ids),), n))
    responses = [g.response_ids for g in gens]
    reference = hf_pooled(pair, ids, responses)
    forced = pooled_activations(pair.tl, ids, responses, range(pair.tl.cfg.n_layers))
    captured = torch.stack([g.pooled for g in gens if g.pooled is not None])
    row: dict[str, Any] = {
        "model": pair.name, "dtype": dtype, "accelerated": is_accelerated(pair.tl),
        "compared": int(first_tie.sum()), "tokens": n * len(ids),
        "rows_identical": int((first_diff == n).sum()), "rows": len(ids),
        "greedy_ok": bool((first_diff >= first_tie).all()),
        "logit_err": logit_err, "capture_err": _rel_err(captured, reference),
        "forced_err": _rel_err(forced, reference), "tol": TOL[dtype],
    }  # fmt: skip
    worst = max(row["logit_err"], row["capture_err"], row["forced_err"])
    row["passed"] = row["greedy_ok"] and worst <= row["tol"]
    return row


def contenders(pair: Pair, ids: Sequence[Sequence[int]]) -> dict[str, Callable[[int], int]]:
    """Each generates ``n`` forced tokens per prompt and returns how many it produced."""
    tokens, mask = left_pad(ids, pair.pad_id, pair.tl.cfg.device or "cpu")
    capture = _capture(pair)

    def ours(n: int) -> int:
        gens = generate_batch(pair.tl, ids, _greedy(n), [0] * len(ids), capture=capture)
        return sum(len(g.response_ids) for g in gens)

    @torch.inference_mode()
    def hf(n: int) -> int:
        out = pair.hf.generate(
            input_ids=tokens, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
            do_sample=False,
        )  # fmt: skip
        return (out.shape[1] - tokens.shape[1]) * out.shape[0]

    def hf_hooks(n: int) -> int:
        layers = pair.hf.model.layers
        sums = torch.zeros(len(layers), len(ids), pair.tl.cfg.d_model, device=tokens.device)

        def record(j: int) -> Callable[..., None]:
            def hook(_m: object, _i: object, o: Any) -> None:
                act = o[0] if isinstance(o, tuple) else o
                if act.shape[1] == 1:  # decode steps: the input is a response token
                    sums[j] += act[:, -1].float()

            return hook

        hooks = [layer.register_forward_hook(record(j)) for j, layer in enumerate(layers)]
        try:
            return hf(n)
        finally:
            for h in hooks:
                h.remove()

    return {OURS: ours, HF: hf, HF_HOOKS: hf_hooks}


def speed(pair: Pair, plan: Plan, report: Report) -> None:
    """The speed table of one model, a row group written as each batch size is measured."""
    device = torch.device(pair.tl.cfg.device or "cpu")
    report.add(
        "", f"### {pair.name}: speed, {plan.new_tokens} forced new tokens per row", "",
        "| batch | contender | tokens | seconds | tokens/s | / transformers |",
        "|---:|---|---:|---:|---:|---:|",
    )  # fmt: skip
    for batch in plan.batches:
        runs = contenders(pair, prompts(batch, pair.vocab, plan.seed + batch))
        measured: dict[str, tuple[int, float]] = {}
        for name, run in runs.items():
            run(2)  # warm-up: allocations, kernels, lazy imports
            sync(device)
            start = time.perf_counter()
            count = run(plan.new_tokens)
            sync(device)
            measured[name] = (count, time.perf_counter() - start)
        base = measured[HF][0] / measured[HF][1]
        report.add(*(
            f"| {batch} | {name} | {count} | {secs:.2f} | {count / secs:,.0f} | "
            f"{count / secs / base:.2f} |"
            for name, (count, secs) in measured.items()
        ))  # fmt: skip


def _equality_lines(row: dict[str, Any]) -> list[str]:
    verdict = "pass" if row["passed"] else "**FAIL**"
    return [
        f"| {row['model']} | {row['dtype']} | {'yes' if row['accelerated'] else 'no'} | "
        f"{row['rows_identical']}/{row['rows']} | {row['compared']}/{row['tokens']} | "
        f"{'yes' if row['greedy_ok'] else 'no'} | {row['logit_err']:.1e} | "
        f"{row['capture_err']:.1e} | {row['forced_err']:.1e} | {row['tol']:.0e} | {verdict} |"
    ]


EQUALITY_HEAD = [
    "| model | dtype | accelerated | rows identical | tokens compared | greedy agrees | "
    "logit err | capture err | teacher-forced err | tolerance | verdict |",
    "|---|---|---|---:|---:|---|---:|---:|---:|---:|---|",
]


def _header(plan: Plan) -> list[str]:
    from importlib.metadata import version

    on_gpu = torch.device(plan.device).type == "cuda"
    lines = [
        "# GPU check: tlextract against transformers on random-weight models", "",
        "Written by `make gpu-check` (`python -m tlextract.benchmarks.gpu_check`), table by table; "
        "see docs/gpu.md.", "",
        f"- Machine: {machine()}; device `{plan.device}`"
        + (f" ({torch.cuda.get_device_name(plan.device)})" if on_gpu else ""),
        f"- torch {torch.__version__}, transformers {version('transformers')}, "
        f"TransformerLens {version('transformer-lens')}, Python {sys.version.split()[0]}",
        f"- Shapes: {'tiny (a few thousand parameters)' if plan.shape.tiny else 'real'}"
        f"{f', first {plan.shape.layers} blocks only' if plan.shape.layers else ''}; models "
        f"{', '.join(plan.models)}; equality: {plan.check_rows} prompts x {plan.check_tokens} "
        f"greedy tokens; speed: batches {', '.join(map(str, plan.batches))} x "
        f"{plan.new_tokens} forced tokens in {', '.join(plan.time_dtypes)}; seed {plan.seed}",
        f"- Tolerance on the relative error of logits and pooled residuals: {_per_dtype(TOL)}; a "
        "greedy step is compared where transformers' top-2 logit margin exceeds twice the "
        "largest logit difference between the two models at that step (teacher-forced)",
        f"- Options: `{plan.command or '(defaults)'}`",
    ]  # fmt: skip
    if not on_gpu:
        lines += ["", f"**Not run on a GPU.** This report comes from a run on `{plan.device}`: it "
                  "shows that the check's code works there, not how fast tlextract is on a GPU. "
                  "`make gpu-check` on a GPU machine replaces it."]  # fmt: skip
    return lines


def _per_dtype(tol: dict[str, float]) -> str:
    return ", ".join(f"{dtype} {value:.0e}" for dtype, value in tol.items())


def check_model(name: str, plan: Plan, work: Path, report: Report) -> None:
    """Equality in each dtype (untimed dtypes first), then speed in the last one if timed."""
    dtypes = sorted(MODEL_DTYPES[name], key=lambda d: d in plan.time_dtypes)
    report.add("", f"## {name}", "", *EQUALITY_HEAD)
    for dtype in dtypes:
        pair = build_pair(name, plan.device, DTYPES[dtype], plan.shape, plan.seed, work)
        try:
            row = equality(pair, dtype, plan)
            report.add(*_equality_lines(row))
            if not row["passed"]:
                report.failures.append(f"{name} {dtype}: equality")
            if dtype in plan.time_dtypes:
                speed(pair, plan, report)
        finally:
            del pair
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def run_check(plan: Plan, work: Path | None = None) -> Report:
    """Every model of the plan; a model that raises is reported and the next one runs."""
    report = Report(plan.out)
    report.add(*_header(plan))
    with tempfile.TemporaryDirectory(prefix="tlx-gpu-check-", dir=work) as tmp:
        for name in plan.models:
            try:
                check_model(name, plan, Path(tmp), report)
            except Exception as e:  # reported, and the other models still run
                first = next(iter(str(e).splitlines()), "")
                report.failures.append(f"{name}: {type(e).__name__}: {first}")
                report.add("", f"**{name} failed**: `{type(e).__name__}: {first}`")
    verdict = "all checks passed" if not report.failures else "; ".join(report.failures)
    report.add("", f"Result: {verdict}.")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tlextract.benchmarks.gpu_check", description=__doc__
    )
    p.add_argument("--out", type=Path, default=Path("docs/benchmarks/gpu.md"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="a few thousand parameters (CPU test)")
    p.add_argument("--layers", type=int, help="keep only the first N blocks of each model")
    p.add_argument("--models", default=",".join(CONFIGS), help=f"of {', '.join(CONFIGS)}")
    p.add_argument("--batches", default="1,8,32,64")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--check-rows", type=int, default=8)
    p.add_argument("--check-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    unknown = set(a.models.split(",")) - set(CONFIGS)
    if unknown:
        p.error(f"--models: unknown {', '.join(sorted(unknown))}; use {', '.join(CONFIGS)}")
    plan = Plan(
        out=a.out, device=a.device, shape=Shape(a.tiny, a.layers),
        models=tuple(a.models.split(",")), batches=tuple(int(b) for b in a.batches.split(",")),
        new_tokens=a.new_tokens,
        check_rows=a.check_rows, check_tokens=a.check_tokens, seed=a.seed,
        command=" ".join(sys.argv[1:] if argv is None else argv),
    )  # fmt: skip
    report = run_check(plan)
    print("\n".join(report.lines))
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
