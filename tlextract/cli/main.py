"""``python -m tlextract <stage>``: one subcommand per stage, plus ``run`` for all of them."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

from tlextract.config import Experiment, experiments_root, load_experiment
from tlextract.errors import TLExtractError
from tlextract.ops.methods import METHODS
from tlextract.ops.metrics import RULES
from tlextract.ops.vectors import TraitVectors
from tlextract.settings import DTYPES, MODES, STAGES, RunSettings, settings_for
from tlextract.stages.common import model_loader
from tlextract.stages.run import run_trait
from tlextract.traits import VARIANTS

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
    return parser


def add_run_options(p: argparse.ArgumentParser, variant_all: bool) -> None:
    """What selects and overrides a trait run (every stage command takes these)."""
    p.add_argument("--experiment", default=DEFAULT_EXPERIMENT)
    p.add_argument("--traits", "--trait", default="all",
                   help="comma-separated trait names, or 'all' (default)")
    p.add_argument("--experiments-dir", type=Path, default=None,
                   help="where experiments live (default: $TLEXTRACT_EXPERIMENTS or ./experiments)")
    p.add_argument("--model", default=None, help="override the experiment's model")
    p.add_argument("--n-examples", "--n_examples", type=int, default=None,
                   help="responses per polarity")
    p.add_argument("--batch-size", "--batch_size", type=parse_batch_size, default=None,
                   help="prompts per batch (1: serial), or 'auto': the largest that fits "
                   "--memory-budget")
    p.add_argument("--memory-budget", type=float, default=None,
                   help="GiB that --batch-size auto may use beyond the weights (default: half "
                   "the available RAM on CPU, 80%% of free GPU memory)")
    p.add_argument("--layers", type=parse_layers, default=None,
                   help="'all', '16', '0,4,8' or '10-20' (TransformerLens block indices)")
    p.add_argument("--mode", default="two-stage", choices=MODES,
                   help="two-stage: a teacher-forced pass after generation; combined: record "
                   "activations while generating (no second pass)")
    p.add_argument("--variant", default=None,
                   choices=(*VARIANTS, "all") if variant_all else VARIANTS,
                   help="instruction: system-message instruction pairs; natural: prompts that "
                   "elicit each pole with no instruction (natural_pos.txt / natural_neg.txt); "
                   "all: both (default: the experiment's \"variant\")")
    p.add_argument("--judge", default=None, choices=("none", "local"),
                   help="override the experiment's judge: none keeps every response; local "
                   "scores with the studied model itself")
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if available)")
    p.add_argument("--dtype", default="float32", choices=DTYPES,
                   help="model weights; pooling and vectors are always float32")  # fmt: skip


def add_report_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated")
    p.add_argument("--test-fraction", type=float, default=0.25)
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out split")
    p.add_argument("--rule", default="auroc", choices=RULES, help="best-layer rule")
    p.add_argument("--layer", type=int, default=None,
                   help="layer of the cosine matrix (default: median best layer)")  # fmt: skip


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

    path = build_report(
        experiment,
        None if args.traits == "all" else args.traits.split(","),
        variants=VARIANTS if args.variant == "all" else (args.variant and (args.variant,)),
        methods=args.methods.split(","),
        layer=args.layer,
        test_fraction=args.test_fraction,
        seed=args.seed,
        rule=args.rule,
        **_overrides(args),
    )
    print(f"report: {path}")


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The settings_for overrides every stage command takes (the run's outputs depend on them)."""
    keys = ("model", "n_examples", "layers", "mode", "dtype", "judge")
    return {k: getattr(args, k) for k in keys}


# --- steer and monitor: they read a run's saved vectors, so they take no stage options ---------


def parse_floats(text: str) -> list[float]:
    """'-1,-0.5,0,0.5,1' (write --alphas=-1,... : argparse reads '-1,...' as an option)."""
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: use comma-separated numbers") from None


def add_intervention_commands(sub: argparse._SubParsersAction) -> None:
    helps = {
        "steer": "steer held-out questions at several strengths (and ablate): sweep.json, plot",
        "monitor": "score every token of the answers to --prompt on each trait's vector",
    }
    for name, text in helps.items():
        p = sub.add_parser(name, help=text)
        p.add_argument("--experiment", default=DEFAULT_EXPERIMENT)
        p.add_argument("--traits", "--trait", default="all", help="comma-separated, or 'all'")
        p.add_argument("--experiments-dir", type=Path, default=None)
        p.add_argument("--model", default=None, help="override the experiment's model")
        p.add_argument("--variant", default=None, choices=VARIANTS,
                       help="whose vectors: the instruction or the natural run (default: the "
                       "experiment's)")
        p.add_argument("--layer", type=int, default=None,
                       help="block index (default: each trait's best mean_diff layer in its "
                       "report/metrics.json, else the middle of its layers)")
        p.add_argument("--device", default=None)
        p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    steer_p, monitor_p = (sub.choices[name] for name in helps)
    steer_p.add_argument("--alphas", type=parse_floats, default=None,
                         help="strengths in typical residual norms, e.g. --alphas=-1,0,1 "
                         "(default -1,-0.5,-0.25,0,0.25,0.5,1)")
    steer_p.add_argument("--n-questions", type=int, default=8, help="held-out questions")
    steer_p.add_argument("--positions", default="all", choices=("all", "prompt", "response"))
    steer_p.add_argument("--no-ablate", dest="ablate", action="store_false",
                         help="skip the ablation condition")
    steer_p.add_argument("--judge", default=None, choices=("none", "local"),
                         help="override the experiment's judge")
    monitor_p.add_argument("--prompt", action="append", required=True,
                           help="a user message to answer (repeat for more)")
    monitor_p.add_argument("--color-trait", default=None,
                           help="the trait that colours the HTML page (default: the first)")
    monitor_p.add_argument("--max-new-tokens", type=int, default=None,
                           help="default: the experiment's")


def _saved_run(args: argparse.Namespace, experiment: Experiment, trait: str) -> tuple[
        RunSettings, TraitVectors, int]:
    """The run, its saved mean_diff vectors and the layer to use (said on stdout)."""
    from tlextract.settings import report_dir

    run = settings_for(experiment, trait, model=args.model, variant=args.variant,
                       device=args.device, dtype=args.dtype, judge=getattr(args, "judge", None))
    path = run.stage_dir("vectors") / "mean_diff.pt"
    if not path.exists():
        raise TLExtractError(
            f"{path}: no mean_diff vectors. Extract them first: python -m tlextract run "
            f"--experiment {experiment.name} --traits {trait} --variant {run.variant}.")
    vectors = TraitVectors.load(path)
    metrics = report_dir(run) / "metrics.json"
    best = json.loads(metrics.read_text())["best"].get("mean_diff") if metrics.exists() else None
    if args.layer is not None:
        layer, why = args.layer, "--layer"
    elif best is not None and best["layer"] in vectors.layers:
        layer, why = best["layer"], f"best mean_diff layer {best['layer']} in {metrics}"
    else:
        layer = vectors.layers[len(vectors.layers) // 2]
        why = "middle of the vectors' layers (no evaluation report: python -m tlextract report)"
    print(f"[{trait}] layer {layer}: {why}")
    return run, vectors, layer


def steer_command(args: argparse.Namespace, experiment: Experiment) -> None:
    from tlextract.analysis.sweep import DEFAULT_ALPHAS, alpha_sweep
    from tlextract.config import split_judge
    from tlextract.judge.cache import JudgeCache
    from tlextract.judge.registry import make_judge
    from tlextract.report.sweep_view import sweep_table, write_sweep

    saved = [_saved_run(args, experiment, t) for t in _trait_names(args, experiment)]
    get_model = model_loader(saved[0][0])
    for run, vectors, layer in saved:
        model = get_model()
        judge = make_judge(split_judge(run.judge)[0], model=model)
        out = run.out_dir / "steer"
        sweep = alpha_sweep(
            model, run, vectors, layer, args.alphas or DEFAULT_ALPHAS, args.n_questions,
            positions=args.positions, ablation=args.ablate, judge=judge,
            judge_cache=JudgeCache(out / "judge_cache.jsonl") if judge is not None else None)
        paths = write_sweep(sweep, out)
        print(sweep_table(sweep) + f"[{run.trait.name}] steering sweep -> "
              + ", ".join(map(str, paths)))


def monitor_command(args: argparse.Namespace, experiment: Experiment) -> None:
    from dataclasses import replace

    from tlextract.analysis.sweep import pole_means
    from tlextract.ops.monitor import monitor
    from tlextract.ops.steer import unit_direction
    from tlextract.report.monitor_view import write_monitoring

    saved = {t: _saved_run(args, experiment, t) for t in _trait_names(args, experiment)}
    if args.color_trait not in (None, *saved):
        raise TLExtractError(f"--color-trait {args.color_trait!r} is not among {list(saved)}.")
    first = next(iter(saved.values()))[0]
    model = model_loader(first)()
    gen = experiment.generation
    mon = monitor(
        model, args.prompt, {t: tv for t, (_, tv, _) in saved.items()},
        {t: layer for t, (_, _, layer) in saved.items()}, style=experiment.prompt_style,
        settings=replace(gen, max_new_tokens=args.max_new_tokens or gen.max_new_tokens),
        seeds=[experiment.seed + i for i in range(len(args.prompt))])
    poles = {t: pole_means(run, layer, unit_direction(model, tv, layer)[1])
             for t, (run, tv, layer) in saved.items()}
    out = experiment.path / ("monitor" + first.out_dir.name.removeprefix("extraction"))
    paths = write_monitoring(mon, out, args.color_trait or mon.traits[0], poles)
    print(f"monitor: {len(mon.texts)} answers -> {', '.join(map(str, paths))}")


def _trait_names(args: argparse.Namespace, experiment: Experiment) -> tuple[str, ...]:
    return experiment.traits if args.traits == "all" else tuple(args.traits.split(","))


INTERVENTIONS = {"steer": steer_command, "monitor": monitor_command}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with console_logging():
        return _main(args)


def _main(args: argparse.Namespace) -> int:  # long: one dispatch over the commands
    try:
        experiment = load_experiment(args.experiment, args.experiments_dir or experiments_root())
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
