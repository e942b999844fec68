"""``screen``: the projection difference of every sample of a training dataset on the saved
vectors of each trait (:mod:`tlextract.stages.screening`), the model's own responses cached as a
stage (:mod:`tlextract.stages.screen`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from tlextract.cli.interventions import saved_run
from tlextract.cli.options import Group, option, trait_names
from tlextract.config import Experiment
from tlextract.screen_data import read_samples

SCREEN: Group = (
    option("--data", required=True, type=Path,
           help="the training samples: a JSONL file (one object a line) or a directory saved by "
           "datasets' save_to_disk, with 'prompt' and 'response' or chat 'messages' (the last "
           "one the assistant's response); an optional boolean 'label' on every sample "
           "reports the AUROC of the ranking for label=true (a planted check)"),
    option("--max-samples", type=int, default=None, help="screen the first N samples only"),
)  # fmt: skip


def screen_command(args: argparse.Namespace, experiment: Experiment) -> None:
    from dataclasses import asdict

    from tlextract.locks import run_lock
    from tlextract.ops.fit import check_layers
    from tlextract.report.screen_view import summary, write_screening
    from tlextract.settings import screen_dir
    from tlextract.stages.common import batch_size, model_loader
    from tlextract.stages.screen import generate_own
    from tlextract.stages.screening import check_vectors, sample_ids, score

    samples = read_samples(args.data, args.max_samples)
    saved = [saved_run(args, experiment, t) for t in trait_names(args, experiment)]
    for _, tv, layer in saved:
        check_layers(tv, [layer])  # before the model loads
    first, name = saved[0][0], Path(args.data).stem
    vectors = {run.trait.name: tv for run, tv, _ in saved}
    layers = {run.trait.name: layer for run, _, layer in saved}
    blocks = sorted(set(layers.values()))
    get_model = model_loader(first)
    model = get_model()
    check_vectors(model, vectors, layers)  # before anything is generated or written
    out = screen_dir(first, name)
    with run_lock(out):
        own = generate_own(first, get_model, samples, name, blocks)
        ids = sample_ids(model, samples, experiment.prompt_style)
        longest = max(len(p) + max(len(r), len(o)) for p, r, o in zip(*ids, own, strict=True))
        size = batch_size(first, model, longest, len(samples), blocks)
        screening = score(model, vectors, layers, samples, ids, own, size,
                          asdict(experiment.generation))  # fmt: skip
        paths = write_screening(screening, out, str(args.data))
    for ts in screening.traits.values():
        print(summary(ts))
    print(f"screen: {screening.n_samples} samples -> {', '.join(map(str, paths))}")
