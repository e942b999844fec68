"""How well does a local judge agree with the instruction polarity? Measured, not assumed.

For every trait and variant with responses, the local judge (the studied model by default) reads
each response with the trait's eval prompt; from its exact distribution over 0-100 we take the
mass on numbers and the probability-weighted score. Reported per run: the median mass, how many
judgments would be missing at the configured ``min_mass``, the mean score per polarity, and the
AUROC of the score between pos and neg responses (0.5 = no agreement), both over the judgments
that are not missing and over all of them (renormalised, as if ``min_mass`` were 0).

``python -m tlextract.analysis.agreement --experiment smollm2_cognitive --variant all`` writes
``experiments/<exp>/report/judge_agreement.{md,json}``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from tlextract.config import experiments_root, load_experiment
from tlextract.errors import TLExtractError
from tlextract.judge.base import DEFAULT_MIN_MASS, fill_prompt
from tlextract.judge.local import LocalJudge
from tlextract.model.load import load_model
from tlextract.ops.metrics import auroc
from tlextract.settings import experiment_report_dir, settings_for
from tlextract.stages.common import model_loader
from tlextract.stages.generate import load_responses, responses_key
from tlextract.store import stage_done, write_json, write_text
from tlextract.traits import VARIANTS


@dataclass(frozen=True)
class Agreement:
    trait: str
    variant: str
    n: dict[str, int]
    median_mass: float
    missing: dict[str, int]  # at min_mass
    mean_score: dict[str, float | None]  # over judgments that are not missing
    auroc: float | None  # over judgments that are not missing (None: a side has none)
    auroc_all: float  # every judgment, renormalised over 0-100 whatever its mass


def _auroc(pos: list[float], neg: list[float]) -> float | None:
    if not pos or not neg:
        return None
    return float(auroc(torch.tensor(pos)[:, None], torch.tensor(neg)[:, None])[0])


def measure(
    judge: LocalJudge, eval_prompt: str, rows: Sequence[dict], trait: str, variant: str
) -> Agreement:
    """Agreement of ``judge`` with the polarity of ``rows`` (response records)."""
    rows = [r for r in rows if r["n_response_tokens"] > 0]
    probs = judge.number_probs(
        [fill_prompt(eval_prompt, r["question"], r["response"]) for r in rows]
    )
    valid = ~probs.isnan().any(dim=-1)  # a NaN row: the prompt did not fit the context
    probs = probs.nan_to_num(0.0)
    mass = probs.sum(dim=-1)
    scores = (probs @ torch.arange(101, dtype=probs.dtype)) / mass.clamp_min(1e-300)
    kept = valid & (mass >= judge.min_mass)
    by = {p: [i for i, r in enumerate(rows) if r["polarity"] == p] for p in ("pos", "neg")}

    def values(pol: str, only_kept: bool) -> list[float]:
        return [float(scores[i]) for i in by[pol] if (kept[i] if only_kept else valid[i])]

    return Agreement(
        trait=trait,
        variant=variant,
        n={p: len(ix) for p, ix in by.items()},
        median_mass=float(mass.median()),
        missing={p: sum(not bool(kept[i]) for i in ix) for p, ix in by.items()},
        mean_score={
            p: round(statistics.fmean(values(p, True)), 1) if values(p, True) else None for p in by
        },
        auroc=_auroc(values("pos", True), values("neg", True)),
        auroc_all=float(_auroc(values("pos", False), values("neg", False)) or 0.5),
    )


def markdown(results: Sequence[Agreement], judge_name: str, min_mass: float) -> str:
    def fmt(x: float | None) -> str:
        return "-" if x is None else f"{x:.2f}"

    lines = [
        f"Judge `{judge_name}`; missing = under {min_mass:g} of its probability on 0-100.",
        "",
        "| trait | variant | responses pos/neg | median mass on 0-100 | missing pos/neg | "
        "mean score pos/neg | AUROC (not missing) | AUROC (all, renormalised) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {a.trait} | {a.variant} | {a.n['pos']}/{a.n['neg']} | {a.median_mass:.2f} | "
        f"{a.missing['pos']}/{a.missing['neg']} | {fmt(a.mean_score['pos'])} / "
        f"{fmt(a.mean_score['neg'])} | {fmt(a.auroc)} | {a.auroc_all:.2f} |"
        for a in results
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tlextract.analysis.agreement", description=__doc__
    )
    parser.add_argument("--experiment", default="smollm2_cognitive")
    parser.add_argument("--traits", default="all")
    parser.add_argument("--variant", default="all", choices=(*VARIANTS, "all"))
    parser.add_argument("--min-mass", type=float, default=DEFAULT_MIN_MASS)
    parser.add_argument(
        "--judge-model", default=None, help="a model tlextract can load (default: the studied one)"
    )
    args = parser.parse_args(argv)
    try:
        exp = load_experiment(args.experiment, experiments_root())
        traits = exp.traits if args.traits == "all" else tuple(args.traits.split(","))
        variants = VARIANTS if args.variant == "all" else (args.variant,)
        runs = [settings_for(exp, t, variant=v) for v in variants for t in traits]
        runs = [r for r in runs if stage_done(r.stage_dir("generate"), responses_key(r))]
        if not runs:
            raise TLExtractError(f"{exp.name}: no responses yet; run `make traits` first.")
        model = load_model(args.judge_model) if args.judge_model else None
        judge = LocalJudge(model or model_loader(runs[0])(), min_mass=args.min_mass)
        out = experiment_report_dir(exp)
        results = []
        for run in tqdm(runs, desc="judge agreement", unit="run"):
            rows = list(load_responses(run)[0])
            results.append(measure(judge, run.trait.eval_prompt, rows, run.trait.name, run.variant))
            # Written after every run: a long measurement keeps what it has if stopped.
            write_json(out / "judge_agreement.json", [asdict(a) for a in results])
            write_text(out / "judge_agreement.md", markdown(results, judge.name, args.min_mass))
    except TLExtractError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(markdown(results, judge.name, args.min_mass))
    print(f"judge agreement -> {out / 'judge_agreement.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
