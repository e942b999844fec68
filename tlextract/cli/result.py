"""The few lines a run ends with: whether the vectors are any good (cross-validated, with
intervals and the surface baseline beside them), where the files are, and what to run next."""

from __future__ import annotations

from tlextract.cli.options import flag_message
from tlextract.config import DEFAULT_EXPERIMENT
from tlextract.errors import TLExtractError
from tlextract.evaluation.crossval import HEADLINE, cross_validate, verdict
from tlextract.model.source import backend_of
from tlextract.settings import RunSettings, report_dir

BACKEND_NAMES = {"hooked": "HookedTransformer", "bridge": "TransformerBridge"}


def _next_commands(run: RunSettings) -> list[str]:
    exp = run.experiment
    # What this run set otherwise than its experiment, named again in the next commands.
    changed = {
        name: mine
        for name, mine, default in (("variant", run.variant, exp.variant),
                                    ("engine", run.engine.kind, exp.engine.kind))
        if mine != default
    }  # fmt: skip
    make = f"trait={run.trait.name}"
    if exp.name != DEFAULT_EXPERIMENT:
        make += f" experiment={exp.name}"
    make += "".join(f" {name}={value}" for name, value in changed.items())
    cli = f"--experiment {exp.name} --traits {run.trait.name} --variant {run.variant}"
    if "engine" in changed:
        cli += f" --engine {changed['engine']}"
    return [
        f"  next: make report {make}   (every method, layer plots, cosine matrix)",
        f"        make steer {make}    (layer and strength chosen, random-direction control)",
        f'        python -m tlextract monitor {cli} --prompt "..."',
    ]


def result_card(run: RunSettings, seconds: float) -> list[str]:
    """Lines to print once ``run``'s vectors exist."""
    name = run.trait.name
    backend = BACKEND_NAMES[backend_of(run.model, run.model_backend)]
    lines = [
        f"[{name}] done in {seconds:.0f} s; results in {run.out_dir}",
        f"  model {run.model} on {backend}",
    ]
    try:
        cv = cross_validate(run, [HEADLINE])
    except TLExtractError as e:  # e.g. fewer examples than folds: say so, the run still worked
        lines.append(f"  no cross-validated figures: {flag_message(e)} (report takes --folds)")
        return lines + _next_commands(run)
    m = cv.get(HEADLINE)
    lines += [
        f"  {HEADLINE} vectors: {run.stage_dir('vectors')} ({len(cv.layers)} layers, "
        f"{cv.n['pos']} pos / {cv.n['neg']} neg responses kept)",
        f"  use layer {cv.layer[HEADLINE]} (highest out-of-fold AUROC). Nested {cv.folds}-fold "
        "cross-validation, each fold's layer chosen without it, 95% intervals:",
        f"    accuracy {m.accuracy}   AUROC {m.auroc}   Cohen's d {m.cohens_d}",
        f"  {verdict(cv, HEADLINE)}",
        f"  details: {report_dir(run) / 'crossval.md'}",
    ]
    return lines + _next_commands(run)
