"""``alarm``: every formulation of the per-token alarm measured at ``--false-alarm-rate`` on each
trait, and the alarm ``monitor`` would use; ``alarm.{md,json}`` in the monitor's folder."""

from __future__ import annotations

import argparse
import time

from tlextract.ops.trait_vectors import TraitVectors
from tlextract.settings import RunSettings, monitor_dir
from tlextract.stages.common import model_loader


def compare(
    args: argparse.Namespace, saved: dict[str, tuple[RunSettings, TraitVectors, int]]
) -> None:
    from tlextract.monitoring.alarm import DEFAULT_FORMULATION, fit_alarm, measure
    from tlextract.monitoring.alarm_data import FORMULATIONS, Formulation, load_token_data
    from tlextract.ops.neutral import corpus_split
    from tlextract.report.alarm_view import formulations_table, write_alarm_report

    first = next(iter(saved.values()))[0]
    model = model_loader(first)()
    rate, seed = args.false_alarm_rate, first.experiment.seed
    figures, alarms = {}, {}
    for t, (run, _, layer) in saved.items():
        start = time.perf_counter()
        data, names = load_token_data(model, run)
        formulations = [Formulation("mean_diff", 1, layer), *FORMULATIONS]
        figures[t] = [measure(data, f, rate, args.folds, seed) for f in formulations]
        shipped = next(x for x in figures[t] if x.formulation == DEFAULT_FORMULATION)
        alarms[t] = fit_alarm(data, t, names, shipped, seed)
        print("\n".join(formulations_table({t: figures[t]})[2:]))
        print(f"{alarms[t].describe()} ({time.perf_counter() - start:.0f} s)")
    cal, test = corpus_split()
    some = next(iter(figures.values()))[0]
    about = (
        f"`{first.experiment.name}` ({first.model}, {first.variant} variant). Neutral text: the "
        f"shipped corpus, {len(cal)} texts to set each threshold and {len(test)} others "
        f"({some.n_test_tokens} answer tokens) to measure it on. TPR: tokens of held-out pos "
        f"responses ({some.n_pos_tokens} of {saved[next(iter(saved))][1].trait}), each fold "
        "scored by a vector fitted without it. The first row of each trait is the layer the "
        "evaluation chose (report/crossval.json); 'layer by its own CV' picks, inside each fold, "
        "the layer with the highest TPR on the other folds."
    )
    paths = write_alarm_report(monitor_dir(first), rate, figures, alarms, about)
    print(f"alarm: {len(alarms)} traits -> {', '.join(map(str, paths))}")
