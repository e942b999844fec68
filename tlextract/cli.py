"""``python -m tlextract <stage>``: one subcommand per stage, plus ``run`` for all of them."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .errors import TLExtractError
from .methods import METHODS
from .metrics import RULES
from .pipeline import MODES, STAGES, model_loader, run_trait, settings_for
from .traits import VARIANTS, Experiment, experiments_root, load_experiment

COMMANDS = {**{stage: (stage,) for stage in STAGES}, "run": STAGES}
DEFAULT_EXPERIMENT = "smollm2_cognitive"


def parse_layers(text: str) -> list[int] | str:
    """'all', '16', '0,4,8' or '10-20' (inclusive)."""
    if text == "all":
        return "all"
    layers: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            layers.extend(range(int(lo), int(hi) + 1) if hi else [int(lo)])
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--layers {text!r}: use 'all', a block index, a list '0,4,8' or a range '10-20'"
        ) from None
    return layers


def parse_batch_size(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: use a positive integer (1 is serial) or 'auto'"
        ) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tlextract", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    helps = {"run": "run all stages", "report": "evaluate vectors on held-out data and plot"}
    for name in (*COMMANDS, "report"):
        p = sub.add_parser(name, help=helps.get(name, f"run the {name} stage"))
        p.add_argument("--experiment", default=DEFAULT_EXPERIMENT)
        p.add_argument(
            "--traits",
            "--trait",
            default="all",
            help="comma-separated trait names, or 'all' (default)",
        )
        p.add_argument(
            "--experiments-dir",
            type=Path,
            default=None,
            help="where experiments live (default: $TLEXTRACT_EXPERIMENTS or ./experiments)",
        )
        p.add_argument("--model", default=None, help="override the experiment's model")
        p.add_argument(
            "--n-examples", "--n_examples", type=int, default=None, help="responses per polarity"
        )
        p.add_argument(
            "--batch-size",
            "--batch_size",
            type=parse_batch_size,
            default=None,
            help="prompts per batch (1: serial), or 'auto': the largest that fits --memory-budget",
        )
        p.add_argument(
            "--memory-budget",
            type=float,
            default=None,
            help="GiB that --batch-size auto may use beyond the weights (default: half the "
            "available RAM on CPU, 80%% of free GPU memory)",
        )
        p.add_argument(
            "--layers",
            type=parse_layers,
            default=None,
            help="'all', '16', '0,4,8' or '10-20' (TransformerLens block indices)",
        )
        p.add_argument(
            "--mode",
            default="two-stage",
            choices=MODES,
            help="two-stage: a teacher-forced pass after generation; combined: record "
            "activations while generating (no second pass)",
        )
        p.add_argument(
            "--variant",
            default="instruction",
            choices=(*VARIANTS, "all") if name == "report" else VARIANTS,
            help="instruction: system-message instruction pairs; natural: prompts that "
            "elicit each pole with no instruction (natural_pos.txt / natural_neg.txt)",
        )
        p.add_argument(
            "--judge",
            default=None,
            choices=("none", "local"),
            help="override the experiment's judge: none keeps every response; local "
            "scores with the studied model itself",
        )
        p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if available)")
        p.add_argument(
            "--dtype",
            default="float32",
            choices=("float32", "bfloat16", "float16"),
            help="model weights; pooling and vectors are always float32",
        )
        if name == "report":
            p.add_argument("--methods", default=",".join(METHODS), help="comma-separated")
            p.add_argument("--test-fraction", type=float, default=0.25)
            p.add_argument("--seed", type=int, default=0, help="seed of the held-out split")
            p.add_argument("--rule", default="auroc", choices=RULES, help="best-layer rule")
            p.add_argument(
                "--layer",
                type=int,
                default=None,
                help="layer of the cosine matrix (default: median best layer)",
            )
    return parser


def report(args: argparse.Namespace, experiment: Experiment) -> None:
    from .report import build_report  # matplotlib only when a report is asked for

    path = build_report(
        experiment,
        None if args.traits == "all" else args.traits.split(","),
        variants=VARIANTS if args.variant == "all" else (args.variant,),
        methods=args.methods.split(","),
        layer=args.layer,
        test_fraction=args.test_fraction,
        seed=args.seed,
        rule=args.rule,
        model=args.model,
        n_examples=args.n_examples,
        layers=args.layers,
        mode=args.mode,
        dtype=args.dtype,
        judge=args.judge,
    )
    print(f"report: {path}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        experiment = load_experiment(args.experiment, args.experiments_dir or experiments_root())
        if args.command == "report":
            report(args, experiment)
            return 0
        traits = experiment.traits if args.traits == "all" else tuple(args.traits.split(","))
        runs = [
            settings_for(
                experiment,
                t,
                model=args.model,
                n_examples=args.n_examples,
                batch_size=args.batch_size,
                memory_budget_gib=args.memory_budget,
                layers=args.layers,
                device=args.device,
                dtype=args.dtype,
                mode=args.mode,
                variant=args.variant,
                judge=args.judge,
            )
            for t in traits
        ]
        get_model = model_loader(runs[0])  # one model for all traits of this command
        for run in runs:
            start = time.perf_counter()
            run_trait(run, COMMANDS[args.command], get_model)
            print(
                f"[{run.trait.name}] done in {time.perf_counter() - start:.0f} s; "
                f"results in {run.out_dir}"
            )
    except TLExtractError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
