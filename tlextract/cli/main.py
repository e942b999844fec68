"""python -m tlextract <command>: one subcommand per stage, run for all of them, and the
commands that read what runs made (report, steer, monitor, compare, alarm, screen, agreement) or
write a trait (new-trait)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NoReturn

from tlextract.cli.compare import COMPARE, compare_command
from tlextract.cli.faults import guarded
from tlextract.cli.interventions import (
    ALARM,
    MONITOR,
    SAVED_RUN,
    STEER,
    alarm_command,
    monitor_command,
    steer_command,
)
from tlextract.cli.newtrait import NEW_TRAIT, new_trait
from tlextract.cli.options import (
    ALL_VARIANTS,
    BACKEND,
    COMMON,
    DEBUG,
    LOADING,
    OVERRIDES,
    REPORT,
    RUN,
    VARIANT,
    Group,
    add_options,
    option,
    trait_names,
)
from tlextract.cli.result import result_card
from tlextract.cli.screen import SCREEN, screen_command
from tlextract.config import DEFAULT_MIN_MASS, EVALUATION, Experiment, load_experiment
from tlextract.errors import TLExtractError, during
from tlextract.inputs import require_directory
from tlextract.settings import STAGES, experiment_report_dir, settings_for
from tlextract.stages.common import model_loader
from tlextract.stages.run import is_done, release, run_trait, starts_vllm_server
from tlextract.traits import VARIANTS, Variant


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
        **_overrides(args),
    )
    print(f"report: {path}")


LIVE: Group = (
    option("--serve", action="store_true",
           help="instead of the HTML file, serve the live page: type a prompt, see each token's "
           "scores, steer (docs/explorer.md)"),
    option("--host", default="127.0.0.1",
           help="--serve: the address to listen on (default %(default)s: this machine only)"),
    option("--port", type=int, default=8765,
           help="--serve: the port (default %(default)s; 0 picks a free one)"),
)  # fmt: skip


def explore(args: argparse.Namespace, experiment: Experiment) -> None:
    """The explorer page (:mod:`tlextract.report.explorer`): one HTML file, data inline; with
    ``--serve`` the live page (:mod:`tlextract.report.live_server`)."""
    from tlextract.report.explorer import build_explorer

    start = time.perf_counter()
    loading = {k: getattr(args, k) for k in ("model", "model_backend", "device", "dtype")}
    if args.serve:
        from tlextract.report.live import load_live
        from tlextract.report.live_server import serve

        if not 0 <= args.port <= 65535:
            raise TLExtractError(f"--port {args.port}: use 0 to 65535 (0 picks a free port).")
        serve(load_live(experiment, trait_names(args, experiment), **loading), args.host, args.port)
        return
    path = build_explorer(experiment, trait_names(args, experiment), **loading)
    size = path.stat().st_size
    print(f"explorer: {path} ({size / 1e6:.2f} MB, {time.perf_counter() - start:.1f} s)")


AGREEMENT: Group = (
    option("--min-mass", type=float, default=DEFAULT_MIN_MASS,
           help="a judgment counts when the judge's probabilities on 0-100 sum to at least "
           "this (default %(default)s)"),
    option("--judge-model", default=None,
           help="a model tlextract can load (default: the studied one)"),
)  # fmt: skip


def agreement(args: argparse.Namespace, experiment: Experiment) -> None:
    """How well a local judge agrees with the polarity of the responses (see
    :mod:`tlextract.judge.agreement`): ``report/judge_agreement.{md,json}``."""
    from tqdm.auto import tqdm

    from tlextract.judge.agreement import markdown, measure
    from tlextract.judge.local import LocalJudge
    from tlextract.model.load import load_model
    from tlextract.stages.responses import load_responses
    from tlextract.store import write_json, write_text

    traits = trait_names(args, experiment)
    runs = [settings_for(experiment, t, variant=v) for v in _variants(args) for t in traits]
    runs = [r for r in runs if is_done(r, STAGES[0])]
    if not runs:
        raise TLExtractError(f"{experiment.name}: no responses yet; run `make traits` first.")
    model = load_model(args.judge_model) if args.judge_model else None
    judge = LocalJudge(model or model_loader(runs[0])(), min_mass=args.min_mass)
    out = experiment_report_dir(experiment)
    results = []
    for run in tqdm(runs, desc="judge agreement", unit="run"):
        rows = list(load_responses(run)[0])
        results.append(measure(judge, run.trait.eval_prompt, rows, run.trait.name, run.variant))
        # Written after every run: a long measurement keeps what it has if stopped.
        write_json(out / "judge_agreement.json", [asdict(a) for a in results])
        write_text(out / "judge_agreement.md", markdown(results, judge.name, args.min_mass))
    print(markdown(results, judge.name, args.min_mass))
    print(f"judge agreement -> {out / 'judge_agreement.md'}")


@dataclass(frozen=True)
class Command:
    """A subcommand: its help, its option groups, and what it runs: ``stages`` of each trait
    run (a stage command), else ``run(args, experiment)`` (its exit status; None is 0)."""

    help: str
    options: tuple[Group, ...]
    run: Callable[[argparse.Namespace, Experiment], int | None] | None = None
    stages: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()


STAGE_OPTIONS = (COMMON, LOADING, RUN, (VARIANT,))
# Every subcommand (build_parser makes the parser from this table, _main runs the row). The stage
# commands name their stages explicitly: "generate" runs the first stage (whose
# output folder is responses/) whatever the stage is called inside, and "responses" does too.
COMMANDS = {
    "generate": Command("run the first stage, the responses", STAGE_OPTIONS, stages=STAGES[:1],
                        aliases=("responses",)),
    "judge": Command("run the judge stage", STAGE_OPTIONS, stages=("judge",)),
    "activations": Command("run the activations stage", STAGE_OPTIONS, stages=("activations",)),
    "vectors": Command("run the vectors stage", STAGE_OPTIONS, stages=("vectors",)),
    "run": Command("run all stages", (COMMON, LOADING, RUN, (ALL_VARIANTS,), BACKEND),
                   stages=STAGES),
    "report": Command("evaluate vectors on held-out data and plot",
                      (COMMON, LOADING, RUN, (ALL_VARIANTS,), REPORT), run=report),
    "steer": Command("steer held-out questions at several strengths (and ablate): sweep.json, "
                     "plot", (SAVED_RUN, STEER), run=steer_command),
    "monitor": Command("score every token of the answers to --prompt on each trait's vector",
                       (SAVED_RUN, MONITOR), run=monitor_command),
    "compare": Command("the run's responses through --other, a model of the same family (a "
                       "fine-tune): each trait's projection shift per layer and per token",
                       (SAVED_RUN, COMPARE), run=compare_command),
    "alarm": Command("compare per-token alarm formulations at a false-alarm rate on neutral "
                     "text", (SAVED_RUN, ALARM), run=alarm_command),
    "screen": Command("rank the samples of a training dataset by how much they push each trait "
                      "(projection difference from the model's own responses): "
                      "screen.{json,md,png}",
                      (SAVED_RUN, SCREEN), run=screen_command),
    "agreement": Command("measure how well a local judge agrees with the polarity of the "
                         "responses: report/judge_agreement.{md,json}",
                         (COMMON, (ALL_VARIANTS.but(default="all"), *AGREEMENT)),
                         run=agreement),
    "explore": Command("write one self-contained HTML page to explore the experiment's saved "
                       "results: report/explorer.html (--serve: a live page)",
                       (COMMON, LOADING, LIVE), run=explore),
    "new-trait": Command("draft a complete trait with an OpenAI-compatible chat model, then "
                         "review it", (NEW_TRAIT,), run=new_trait),
}  # fmt: skip
_BY_NAME = {alias: c for name, c in COMMANDS.items() for alias in (name, *c.aliases)}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tlextract", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, aliases=command.aliases)
        add_options(p, (*command.options, (DEBUG,)))
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The settings_for overrides every stage command takes (the run's outputs depend on them)."""
    return {k: getattr(args, k) for k in OVERRIDES}


def _variants(args: argparse.Namespace) -> tuple[Variant | None, ...]:
    return VARIANTS if args.variant == "all" else (args.variant,)


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
    if args.experiments_dir is not None:
        require_directory(args.experiments_dir, "--experiments-dir", "the experiment directories")
    command = _BY_NAME[args.command]
    with during(args.command):
        experiment = load_experiment(args.experiment, args.experiments_dir)
        log_dirs.append(experiment.path)
        if command.run is not None:
            return command.run(args, experiment) or 0
        return run_stages(args, experiment, command.stages, log_dirs)


def run_stages(
    args: argparse.Namespace, experiment: Experiment, stages: Sequence[str], log_dirs: list[Path]
) -> int:
    """A stage command: ``stages`` of every (trait, variant) run, here or on Ray."""
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
        for variant in _variants(args)
        for t in trait_names(args, experiment)
    ]
    if getattr(args, "backend", "local") == "ray":
        from tlextract.backends.ray import run_on_ray

        rows = run_on_ray(runs, stages, address=args.address, gpus_per_task=args.gpus_per_task,
                          cpus_per_task=args.cpus_per_task)  # fmt: skip
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
        if starts_vllm_server(run, stages):
            get_model = model_loader(runs[0])  # the kept model goes: vLLM wants the GPU
            release()
        start = time.perf_counter()
        run_trait(run, stages, get_model, wait=not args.no_wait)
        seconds = time.perf_counter() - start
        if "vectors" in stages:
            with during(f"[{run.trait.name}] the result card"):
                print("\n".join(result_card(run, seconds)))
        else:
            print(f"[{run.trait.name}] done in {seconds:.0f} s; results in {run.out_dir}")
    return 0
