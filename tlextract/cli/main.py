"""``python -m tlextract <stage>``: one subcommand per stage, plus ``run`` for all of them."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

from tlextract.cli.faults import guarded
from tlextract.cli.interventions import INTERVENTIONS, add_intervention_commands
from tlextract.cli.newtrait import NEW_TRAIT, add_new_trait_command, new_trait
from tlextract.cli.result import result_card
from tlextract.config import DEFAULT_EXPERIMENT, EVALUATION, Experiment, load_experiment
from tlextract.errors import TLExtractError, during
from tlextract.inputs import require_directory
from tlextract.ops.methods import METHODS
from tlextract.settings import DEFAULT_DTYPE, DTYPE_CHOICES, MODES, STAGES, settings_for
from tlextract.stages.common import model_loader
from tlextract.stages.run import release, run_trait, starts_vllm_server
from tlextract.traits import VARIANTS

# The responses stage's command is ``generate`` (what it does); the others are named as their stage.
COMMANDS = {"generate": ("responses",), **{s: (s,) for s in STAGES[1:]}, "run": STAGES}


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


class _Parser(argparse.ArgumentParser):
    """Flag errors in one line (flag, problem, fix) and exit status 2, without the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


class _Console(logging.Handler):
    """The library's log on the console: progress lines on stdout, warnings on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno < logging.WARNING:
            print(record.getMessage(), file=sys.stdout)
        else:
            print(f"{record.levelname.lower()}: {record.getMessage()}", file=sys.stderr)


@contextmanager
def console_logging() -> Iterator[None]:
    logger = logging.getLogger("tlextract")
    handler, level, propagate = _Console(), logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # printed once, here
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tlextract", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    helps = {"run": "run all stages", "report": "evaluate vectors on held-out data and plot"}
    for name in (*COMMANDS, "report"):
        p = sub.add_parser(name, help=helps.get(name, f"run the {name} stage"))
        add_run_options(p, variant_all=name in ("report", "run"))
        if name == "report":
            add_report_options(p)
        if name == "run":
            add_backend_options(p)
    add_intervention_commands(sub)
    add_new_trait_command(sub)
    for p in sub.choices.values():
        p.add_argument("--debug", action="store_true",
                       help="on a bug, print the full traceback here too (it is always saved to "
                       "a log file)")  # fmt: skip
    return parser


def add_run_options(p: argparse.ArgumentParser, variant_all: bool) -> None:
    # long: one add_argument per flag, the help text next to each
    """What selects and overrides a trait run (every stage command takes these)."""
    p.add_argument("--experiment", default=DEFAULT_EXPERIMENT)
    p.add_argument(
        "--traits", "--trait", default="all", help="comma-separated trait names, or 'all' (default)"
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
        help="GiB that --batch-size auto may use beyond the weights (default: half "
        "the available RAM on CPU, 80%% of free GPU memory)",
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
        "--engine",
        default=None,
        choices=("tl", "vllm"),
        help="what generates the responses: tl (TransformerLens) or vllm (a vLLM server "
        'tlextract starts, or --vllm-url); default: the experiment\'s "engine", else tl',
    )
    p.add_argument(
        "--vllm-url",
        default=None,
        help="a running vLLM server to generate with, e.g. http://127.0.0.1:8000/v1 "
        "(implies --engine vllm)",
    )
    p.add_argument(
        "--variant",
        default=None,
        choices=(*VARIANTS, "all") if variant_all else VARIANTS,
        help="instruction: system-message instruction pairs; natural: prompts that "
        "elicit each pole with no instruction (natural_pos.txt / natural_neg.txt); "
        'all: both (default: the experiment\'s "variant")',
    )
    p.add_argument(
        "--judge",
        default=None,
        choices=("none", "local"),
        help="override the experiment's judge: none keeps every response; local "
        "scores with the studied model itself",
    )
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if available)")
    p.add_argument("--dtype", default=DEFAULT_DTYPE, choices=DTYPE_CHOICES,
                   help="model weights; pooling and vectors are always float32")  # fmt: skip
    p.add_argument(
        "--offline",
        action="store_true",
        help="read hub models from the local Hugging Face cache only (sets HF_HUB_OFFLINE=1)",
    )
    p.add_argument(
        "--no-wait",
        dest="no_wait",
        action="store_true",
        help="if another run of the same trait is writing, exit (status 2) instead of waiting",
    )


def add_report_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated")
    p.add_argument("--test-fraction", type=float, default=EVALUATION.test_fraction)
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out split")
    p.add_argument("--folds", type=int, default=EVALUATION.folds,
                   help="cross-validation folds (by example index), headline figures")  # fmt: skip
    p.add_argument("--layer", type=int, default=None,
                   help="cosine matrix layer (default: median cross-validated layer)")  # fmt: skip


def add_backend_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--backend",
        default="local",
        choices=("local", "ray"),
        help="local: one trait after another in this process; ray: one Ray task per "
        "(trait, variant) on every GPU (or CPU) of a Ray cluster (pip install 'tlextract[ray]')",
    )
    p.add_argument(
        "--address",
        default=None,
        help="ray: the cluster to join (e.g. ray://head:10001 or auto; default: $RAY_ADDRESS, "
        "else a local Ray started for this command)",
    )
    p.add_argument(
        "--gpus-per-task",
        type=float,
        default=None,
        help="ray: GPUs per task, fractions allowed (default: 1 on a cluster with GPUs, else 0)",
    )
    p.add_argument("--cpus-per-task", type=float, default=1.0, help="ray: CPUs per task")


def report(args: argparse.Namespace, experiment: Experiment) -> None:
    from tlextract.report.summary import build_report  # matplotlib only when a report is asked for

    n = args.n_examples or experiment.n_examples
    if not 2 <= args.folds <= n:
        raise TLExtractError(
            f"--folds {args.folds}: use 2 to {n} (a fold needs examples of its own, and the "
            f"runs have {n} per side); the default is {EVALUATION.folds}."
        )
    path = build_report(
        experiment,
        None if args.traits == "all" else args.traits.split(","),
        variants=VARIANTS if args.variant == "all" else (args.variant and (args.variant,)),
        methods=args.methods.split(","),
        layer=args.layer,
        test_fraction=args.test_fraction,
        seed=args.seed,
        folds=args.folds,
        folds_arg="--folds",
        **_overrides(args),
    )
    print(f"report: {path}")


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The settings_for overrides every stage command takes (the run's outputs depend on them)."""
    keys = ("model", "n_examples", "layers", "mode", "dtype", "judge", "engine", "vllm_url")
    return {k: getattr(args, k) for k in keys}


def main(argv: Sequence[str] | None = None) -> int:
    """The command line's exit status: 0 done, 2 a known fault (one line), 130/143 interrupted,
    1 a bug (one line; the traceback in a log file, see :mod:`tlextract.cli.faults`)."""
    args = build_parser().parse_args(argv)
    log_dirs: list[Path] = []  # where the command has got to: a bug's traceback goes there
    with console_logging(), _offline(getattr(args, "offline", False)):
        return guarded(lambda: _main(args, log_dirs), debug=args.debug, log_dirs=log_dirs)


@contextmanager
def _offline(on: bool) -> Iterator[None]:
    """HF_HUB_OFFLINE=1 for this command only (tlextract.model.hub reads it when it fetches; a
    local Ray worker started meanwhile inherits it); restored afterwards, so a notebook or test
    process that calls main() is left as it was."""
    before = os.environ.get("HF_HUB_OFFLINE")
    if on:
        os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if on and before is None:
            del os.environ["HF_HUB_OFFLINE"]
        elif on and before is not None:
            os.environ["HF_HUB_OFFLINE"] = before


def _main(args: argparse.Namespace, log_dirs: list[Path]) -> int:
    # long: one dispatch over the commands
    if args.experiments_dir is not None:
        require_directory(args.experiments_dir, "--experiments-dir", "the experiment directories")
    with during(args.command):
        experiment = load_experiment(args.experiment, args.experiments_dir)
        log_dirs.append(experiment.path)
        if args.command == NEW_TRAIT:
            return new_trait(args, experiment)
        if args.command == "report":
            report(args, experiment)
            return 0
        if args.command in INTERVENTIONS:
            INTERVENTIONS[args.command](args, experiment)
            return 0
        traits = experiment.traits if args.traits == "all" else tuple(args.traits.split(","))
        variants = VARIANTS if args.variant == "all" else (args.variant,)
        runs = [
            settings_for(
                experiment,
                t,
                batch_size=args.batch_size,
                memory_budget_gib=args.memory_budget,
                device=args.device,
                variant=variant,
                **_overrides(args),
            )
            for variant in variants
            for t in traits
        ]
        if getattr(args, "backend", "local") == "ray":
            from tlextract.backends.ray import run_on_ray

            rows = run_on_ray(
                runs,
                COMMANDS[args.command],
                address=args.address,
                gpus_per_task=args.gpus_per_task,
                cpus_per_task=args.cpus_per_task,
            )
            failed = [r for r in rows if r["status"] != "done"]
            if failed:
                raise TLExtractError(
                    f"{len(failed)} of {len(rows)} Ray tasks failed; their logs: "
                    + ", ".join(r["log"] for r in failed)
                )
            return 0
        get_model = model_loader(runs[0])  # one model for all traits of this command
        for run in runs:
            log_dirs.append(run.out_dir)
            if starts_vllm_server(run, COMMANDS[args.command]):
                get_model = model_loader(runs[0])  # the kept model goes: vLLM wants the GPU
                release()
            start = time.perf_counter()
            run_trait(run, COMMANDS[args.command], get_model, wait=not args.no_wait)
            seconds = time.perf_counter() - start
            if "vectors" in COMMANDS[args.command]:
                with during(f"[{run.trait.name}] the result card"):
                    print("\n".join(result_card(run, seconds)))
            else:
                print(f"[{run.trait.name}] done in {seconds:.0f} s; results in {run.out_dir}")
    return 0
