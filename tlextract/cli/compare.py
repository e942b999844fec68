"""``compare``: a run's saved responses teacher-forced through its model and through another of
the same family (``--other``: a fine-tune's directory, a hub id, a LoRA adapter directory), and
how far each trait's projection moved, per layer and per token (:mod:`tlextract.stages.compare`).
"""

from __future__ import annotations

import argparse
from functools import cache

import torch

from tlextract.cli.interventions import saved_run
from tlextract.cli.options import Group, option, trait_names
from tlextract.config import Experiment
from tlextract.errors import TLExtractError
from tlextract.model.source import resolve_model
from tlextract.ops.trait_vectors import TraitVectors
from tlextract.settings import RunSettings, compare_dir, settings_for

COMPARE: Group = (
    option("--other", required=True,
           help="the model to compare with the run's (--model): a fine-tune's directory, a hub "
           "id or a LoRA adapter directory of the same family"),
    option("--hook", default=None, choices=("resid_pre", "resid_mid", "resid_post"),
           help="where to read the residual (default: the vectors' own hook)"),
    option("--max-samples", type=int, default=None,
           help="compare on the first N responses (default: all of the run's)"),
    option("--no-wait", dest="no_wait", action="store_true",
           help="if another compare of this pair is writing, exit (status 2) instead of "
           "waiting"),
)  # fmt: skip


def own_vectors(run: RunSettings, other: str, args: argparse.Namespace) -> TraitVectors | None:
    """The other model's own mean_diff vectors of this trait and variant, when it has a run."""
    theirs = settings_for(run.experiment, run.trait.name, model=other, variant=run.variant,
                          engine=args.engine)  # fmt: skip
    path = theirs.stage_dir("vectors") / "mean_diff.pt"
    if not path.exists():
        print(f"[{run.trait.name}] no vectors of {other} yet (no cosines): python -m tlextract "
              f"run --experiment {run.experiment.name} --traits {run.trait.name} --model "
              f"{other} --variant {run.variant} makes them")  # fmt: skip
        return None
    return TraitVectors.load(path)


def cosines(mine: TraitVectors, theirs: TraitVectors | None) -> dict[int, float] | None:
    if theirs is None:
        return None
    common = [layer for layer in mine.layers if layer in theirs.layers]
    return {
        layer: float(torch.nn.functional.cosine_similarity(
            mine[layer].float(), theirs[layer].float(), dim=0))
        for layer in common
    }  # fmt: skip


def compare_command(args: argparse.Namespace, experiment: Experiment) -> None:
    from tlextract.locks import run_lock
    from tlextract.model.load import load_model, load_tokenizer
    from tlextract.ops.fit import check_config_family, check_config_fit, check_layers
    from tlextract.report.compare_view import write_comparison
    from tlextract.stages.common import model_loader
    from tlextract.stages.compare import Plan, run_comparison
    from tlextract.stages.responses import load_responses

    if args.max_samples is not None and args.max_samples < 1:
        raise TLExtractError(f"--max-samples {args.max_samples}: use 1 or more.")
    resolve_model(args.other, fetch_weights=False)  # a name that cannot be a model: one line
    # Every refusal before any model loads, the family's first: finding the layer may write
    # the run's cross-validation report.
    check_config_family(args.model or experiment.model, args.other)
    saved = {t: saved_run(args, experiment, t) for t in trait_names(args, experiment)}
    responses = {}
    for trait, (run, vectors, layer) in saved.items():
        check_layers(vectors, [layer])
        responses[trait] = {(r["polarity"], r["index"]): r["response_ids"]
                            for r in load_responses(run)[0]}  # fmt: skip
        check_config_fit(run.model, vectors)
        check_config_fit(args.other, vectors)
    first = next(iter(saved.values()))[0]
    get_base = model_loader(first)
    get_other = cache(lambda: load_model(args.other, device=first.device, dtype=first.dtype,
                                         backend=first.model_backend))  # fmt: skip
    for trait, (run, vectors, layer) in saved.items():
        plan = Plan(args.other, get_other, vectors, hook=args.hook, max_samples=args.max_samples)
        out = compare_dir(run, args.other)
        with run_lock(out, wait=not args.no_wait):
            comparison, examples = run_comparison(plan, run, get_base)
            tokenizer = load_tokenizer(run.model)
            ids = [responses[trait][(e["polarity"], e["index"])] for e in examples]
            tokens = [tokenizer.batch_decode([[t] for t in row]) for row in ids]
            cos = cosines(vectors, own_vectors(run, args.other, args))
            gaps = {layer: float(vectors[layer].norm()) for layer in comparison.layers}
            paths = write_comparison(comparison, trait, examples, tokens, layer, cos, gaps, out)
        shift = comparison.intervals(trait)[comparison.layers.index(layer)]
        print(
            f"[{trait}] shift at layer {layer} ({comparison.hook}): {shift:.3f} over "
            f"{len(examples)} responses, {shift.value / gaps[layer]:+.1%} of the pos-neg gap "
            f"({gaps[layer]:.3f}) -> {', '.join(map(str, paths))}"
        )
