"""``python -m tlextract.cli.agreement_command``: how well a local judge agrees with the
polarity of the responses (see :mod:`tlextract.judge.agreement`); writes
``experiments/<exp>/report/judge_agreement.{md,json}``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import asdict

from tqdm.auto import tqdm

from tlextract.config import DEFAULT_MIN_MASS, experiments_root, load_experiment
from tlextract.errors import TLExtractError
from tlextract.judge.agreement import markdown, measure
from tlextract.judge.local import LocalJudge
from tlextract.model.load import load_model
from tlextract.settings import experiment_report_dir, settings_for
from tlextract.stages.common import model_loader
from tlextract.stages.responses import load_responses
from tlextract.stages.run import is_done
from tlextract.store import write_json, write_text
from tlextract.traits import VARIANTS


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tlextract.cli.agreement_command", description=__doc__
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
        runs = [r for r in runs if is_done(r, "responses")]
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
