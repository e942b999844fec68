"""``steer``, ``monitor`` and ``alarm``: they read a run's saved vectors, so they take no stage
options."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from tlextract.cli.options import (
    COMMON,
    DEVICE,
    DTYPE,
    ENGINE,
    FOLDS,
    JUDGE,
    LAYER,
    MODEL,
    MODEL_BACKEND,
    VARIANT,
    Group,
    option,
    trait_names,
)
from tlextract.config import Experiment
from tlextract.errors import TLExtractError
from tlextract.model.decoding import Model
from tlextract.ops.bootstrap import Interval
from tlextract.ops.trait_vectors import TraitVectors
from tlextract.settings import RunSettings, monitor_dir, settings_for, steer_dir
from tlextract.stages.common import model_loader

if TYPE_CHECKING:  # the commands import their heavy modules lazily
    from tlextract.judge.answers import JudgeCache
    from tlextract.judge.base import Judge
    from tlextract.monitoring.alarm import Alarm


def parse_floats(text: str) -> list[float]:
    """'-1,-0.5,0,0.5,1' (write --alphas=-1,... : argparse reads '-1,...' as an option)."""
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: use comma-separated numbers") from None


# The options of the three commands that read a run's saved vectors.
SAVED_RUN: Group = (
    *COMMON,
    MODEL,
    MODEL_BACKEND,
    VARIANT.but(help="whose vectors: the instruction or the natural run (default: the "
                "experiment's)"),
    LAYER.but(help="block index (default: each trait's cross-validated mean_diff layer in its "
              "report/crossval.json, else the middle of its layers)"),
    DEVICE,
    DTYPE,
    ENGINE.but(help="the vectors of the run this engine generated for"),
)  # fmt: skip
STEER: Group = (
    option("--alphas", parameter="alphas", type=parse_floats, default=None,
           help="strengths in typical residual norms, e.g. --alphas=-1,0,1 "
           "(default -1,-0.5,-0.25,0,0.25,0.5,1)"),
    option("--n-questions", parameter="n_questions", type=int, default=None,
           help="held-out questions (default 8; --auto: 16 to choose on and 16 others to report "
           "on)"),
    option("--positions", default="all", choices=("all", "prompt", "response")),
    option("--no-ablate", dest="ablate", action="store_false",
           help="skip the ablation condition"),
    option("--auto", action="store_true",
           help="choose the layer and alpha: largest classifier-measured shift toward --pole "
           "within the fluency bounds, reported on other questions against a random direction"),
    option("--pole", parameter="pole", default="pos", choices=("pos", "neg"),
           help="--auto: target"),
    option("--max-kl", parameter="max_kl", type=float, default=None,
           help="--auto: bound on KL(steered || unsteered) per neutral token, nats (default "
           "0.3)"),
    option("--max-logprob-drop", parameter="max_logprob_drop",
           type=float, default=None,
           help="--auto: bound on the fall in log-prob per token of steered answers (default "
           "1.0)"),
    JUDGE.but(help="override the experiment's judge"),
)  # fmt: skip
FALSE_ALARM_RATE = option(
    "--false-alarm-rate", type=float, default=0.05,
    help="share of held-out neutral tokens the alarm may fire on",
)  # fmt: skip
MONITOR: Group = (
    FALSE_ALARM_RATE,
    option("--prompt", action="append", required=True,
           help="a user message to answer (repeat for more)"),
    option("--color-trait", default=None,
           help="the trait that colours the HTML page (default: the first)"),
    option("--max-new-tokens", type=int, default=None, help="default: the experiment's"),
    FOLDS.but(help="cross-validation folds (by example index) of each trait's threshold"),
)  # fmt: skip
ALARM: Group = (FALSE_ALARM_RATE, FOLDS.but(help="cross-validation folds"))


def saved_run(
    args: argparse.Namespace, experiment: Experiment, trait: str
) -> tuple[RunSettings, TraitVectors, int]:
    """The run, its saved mean_diff vectors and the layer to use (said on stdout)."""
    from tlextract.evaluation.crossval import layer_for

    run = settings_for(
        experiment,
        trait,
        model=args.model,
        model_backend=args.model_backend,
        variant=args.variant,
        device=args.device,
        dtype=args.dtype,
        judge=getattr(args, "judge", None),
        engine=args.engine,
    )
    path = run.stage_dir("vectors") / "mean_diff.pt"
    if not path.exists():
        raise TLExtractError(
            f"{path}: no mean_diff vectors. Extract them first: python -m tlextract run "
            f"--experiment {experiment.name} --traits {trait} --variant {run.variant}."
        )
    vectors = TraitVectors.load(path)
    if args.layer is not None:
        layer, why = args.layer, "--layer"
    else:
        try:  # the result card's layer: one rule (tlextract.ops.folds.pick_layer)
            layer, why = layer_for(run, vectors)
        except TLExtractError as e:  # too few examples to cross-validate: say so, still run
            layer = vectors.layers[len(vectors.layers) // 2]
            why = f"middle of the vectors' layers (no cross-validated layer: {e})"
    print(f"[{trait}] layer {layer}: {why}")
    return run, vectors, layer


def steer_command(args: argparse.Namespace, experiment: Experiment) -> None:
    from tlextract.config import split_judge
    from tlextract.judge.answers import JudgeCache
    from tlextract.judge.registry import make_judge
    from tlextract.report.sweep_view import sweep_table, write_sweep
    from tlextract.steering.sweep import DEFAULT_ALPHAS, alpha_sweep

    bounds = {"--max-kl": args.max_kl, "--max-logprob-drop": args.max_logprob_drop}
    for flag, value in bounds.items():
        if value is not None and value <= 0:
            raise TLExtractError(f"{flag} {value}: must be positive (nats per token).")
    saved = [saved_run(args, experiment, t) for t in trait_names(args, experiment)]
    get_model = model_loader(saved[0][0])
    side: dict[str, dict[str, Interval]] = {}
    for run, vectors, layer in saved:
        model = get_model()
        judge = make_judge(split_judge(run.judge)[0], model=model)
        out = steer_dir(run)
        cache = JudgeCache(out / "judge_cache.jsonl") if judge is not None else None
        if args.auto:
            row = _auto(args, run, vectors, layer, model, judge, cache)
            if row is not None:
                side[run.trait.name] = row
            continue
        sweep = alpha_sweep(
            model,
            run,
            vectors,
            layer,
            args.alphas or DEFAULT_ALPHAS,
            args.n_questions or 8,
            positions=args.positions,
            ablation=args.ablate,
            judge=judge,
            judge_cache=cache,
        )
        paths = write_sweep(sweep, out)
        print(
            sweep_table(sweep)
            + f"[{run.trait.name}] steering sweep -> "
            + ", ".join(map(str, paths))
        )
    if side:
        _write_side_effects(saved[0][0], side)


def _write_side_effects(run: RunSettings, rows: dict[str, dict[str, Interval]]) -> None:
    """The trait x trait table of the traits steered in this call, printed and saved."""
    from dataclasses import asdict

    from tlextract.settings import experiment_report_dir
    from tlextract.steering.effects import side_effect_table
    from tlextract.store import write_json, write_text

    out = experiment_report_dir(run.experiment, run.model) / f"side_effects_{run.variant}"
    table = side_effect_table(rows)
    head = ("Side effects of steer --auto: shift in each trait's classifier P(pos) when the row's "
            "trait is steered at its chosen setting (report questions, 95% intervals)")  # fmt: skip
    write_text(out.with_suffix(".md"), "\n".join([f"# {head}", "", *table]) + "\n")
    write_json(out.with_suffix(".json"),
               {s: {c: asdict(i) for c, i in row.items()} for s, row in rows.items()})  # fmt: skip
    print("\n".join([head + ":", *table, f"-> {out.with_suffix('.md')}"]))


def _auto(
    args: argparse.Namespace,
    run: RunSettings,
    vectors: TraitVectors,
    layer: int,
    model: Model,
    judge: Judge | None,
    cache: JudgeCache | None,
) -> dict[str, Interval] | None:
    """Choose, report, write; the steered row of the side-effect table (None: no choice)."""
    from tlextract.report.autosteer_view import write_autosteer
    from tlextract.steering.autosteer import (
        ALPHAS,
        MAX_KL,
        MAX_LOGPROB_DROP,
        N_QUESTIONS,
        auto_steer,
    )

    result = auto_steer(
        model,
        run,
        vectors,
        args.pole,
        layers=[args.layer] if args.layer is not None else None,
        preferred_layer=layer,
        alphas=[abs(a) for a in args.alphas if a] if args.alphas else ALPHAS,
        max_kl=MAX_KL if args.max_kl is None else args.max_kl,
        max_logprob_drop=(
            MAX_LOGPROB_DROP if args.max_logprob_drop is None else args.max_logprob_drop
        ),
        n_questions=args.n_questions or N_QUESTIONS,
        positions=args.positions,
        judge=judge,
        judge_cache=cache,
    )
    paths = write_autosteer(result, steer_dir(run))
    c = result.chosen
    if c is None:
        print(f"[{run.trait.name}] steer --auto: no candidate within the bounds (see {paths[1]})")
        return None
    line = ", ".join(f"{r.name} {r.shift:+.2f}" for r in result.report if r.shift is not None)
    print(
        f"[{run.trait.name}] steer --auto toward {args.pole}: layer {c.layer}, alpha "
        f"{c.alpha:+g} (KL {c.kl:.3f} <= {result.max_kl}); shift in P({args.pole}) on "
        f"{len(result.report_questions)} other questions: {line} -> " + ", ".join(map(str, paths))
    )
    for r in result.report:
        if r.effects is not None:
            drop = r.effects.neutral_logprob_drop
            shown = "-" if drop is None else format(drop, "+.2f")
            print(f"  {r.name}: moved away from {args.pole} on {r.effects.wrong_way} of the "
                  f"questions; neutral log-prob drop {shown}")  # fmt: skip
    steered = next((r for r in result.report if r.name == "steered"), None)
    return steered.effects.side_effects if steered and steered.effects else None


def monitor_command(args: argparse.Namespace, experiment: Experiment) -> None:
    from dataclasses import asdict, replace

    from tlextract.monitoring.alarm_data import monitor_alarm
    from tlextract.ops.monitor import monitor
    from tlextract.ops.steer import unit_direction
    from tlextract.report.monitor_view import above_threshold, write_monitoring
    from tlextract.steering.sweep import pole_means
    from tlextract.store import write_json

    check_rate(args.false_alarm_rate)
    saved = {t: saved_run(args, experiment, t) for t in trait_names(args, experiment)}
    if args.color_trait not in (None, *saved):
        raise TLExtractError(f"--color-trait {args.color_trait!r} is not among {list(saved)}.")
    first = next(iter(saved.values()))[0]
    model = model_loader(first)()
    thresholds = {}
    for t, (run, _, _) in saved.items():
        try:
            thresholds[t] = monitor_alarm(model, run, args.false_alarm_rate, args.folds)
        except TLExtractError as err:  # e.g. no judged activations: monitor without a threshold
            print(f"[{t}] no threshold: {err}")
            continue
        print(thresholds[t].describe())
    # Each trait is watched with its alarm's vector at its alarm's layer, where it has one.
    watch = {
        t: (alarm_vectors(thresholds[t], tv), thresholds[t].layer) if t in thresholds
        else (tv, layer)
        for t, (_, tv, layer) in saved.items()
    }  # fmt: skip
    gen = experiment.generation
    mon = monitor(
        model,
        args.prompt,
        {t: tv for t, (tv, _) in watch.items()},
        {t: layer for t, (_, layer) in watch.items()},
        style=experiment.prompt_style,
        settings=replace(gen, max_new_tokens=args.max_new_tokens or gen.max_new_tokens),
        seeds=[experiment.seed + i for i in range(len(args.prompt))],
    )
    poles = {
        t: pole_means(saved[t][0], layer, unit_direction(model, tv, layer)[1])
        for t, (tv, layer) in watch.items()
    }
    out = monitor_dir(first)
    write_json(out / "calibration.json", {t: asdict(c) for t, c in thresholds.items()})
    paths = [
        out / "calibration.json",
        *write_monitoring(mon, out, args.color_trait or mon.traits[0], poles, thresholds),
    ]
    for i, text in enumerate(mon.texts):
        n = len(text.tokens) - sum(text.is_prompt)
        counts = [f"{t} {sum(above_threshold(text, t, thresholds))}/{n}" for t in thresholds]
        print(f"answer {i}: tokens above threshold: {', '.join(counts) or 'no thresholds'}")
    print(f"monitor: {len(mon.texts)} answers -> {', '.join(map(str, paths))}")


def check_rate(rate: float) -> None:
    if not 0 < rate < 1:
        raise TLExtractError(f"--false-alarm-rate {rate}: use a share between 0 and 1, e.g. 0.05.")


def alarm_vectors(alarm: Alarm, like: TraitVectors) -> TraitVectors:
    """The alarm's unit vector as one-layer TraitVectors (it may be a probe's, not the saved
    mean_diff), so that the monitor scores what the threshold was set on."""
    import torch

    return TraitVectors(like.trait, alarm.figures.formulation.method, like.model, like.hook,
                        (alarm.layer,), torch.tensor([alarm.unit]))  # fmt: skip


def alarm_command(args: argparse.Namespace, experiment: Experiment) -> None:
    from tlextract.cli.alarm_table import compare

    check_rate(args.false_alarm_rate)
    saved = {t: saved_run(args, experiment, t) for t in trait_names(args, experiment)}
    compare(args, saved)
