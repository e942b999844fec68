"""Every flag the subcommands share, declared once (choices from the library's own constants),
and the one table from the library's parameter names to these flags: a library error names
``engine=`` (:class:`tlextract.errors.TLExtractError` ``.parameters``), the CLI prints ``--engine``.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tlextract.config import (
    DEFAULT_EXPERIMENT,
    ENGINE_KINDS,
    EVALUATION,
    MODEL_BACKENDS,
    Experiment,
)
from tlextract.errors import TLExtractError
from tlextract.ops.methods import METHODS
from tlextract.settings import DEFAULT_DTYPE, DTYPE_CHOICES, JUDGE_OVERRIDES, MODES
from tlextract.traits import VARIANTS


@dataclass(frozen=True)
class Option:
    """One flag: its names, ``add_argument``'s keywords, and the library parameter it sets
    (when a library error may name it)."""

    flags: tuple[str, ...]
    settings: Mapping[str, Any]
    parameter: str | None = None

    def but(self, **changes: Any) -> Option:
        """This flag with some keywords changed for one command (its help, default, choices)."""
        return replace(self, settings={**self.settings, **changes})


# The one table from a library parameter to the flag that sets it, filled as each flag is
# declared (here and in the command modules), so a library error naming ``engine=`` prints
# ``--engine`` whichever command raised it.
FLAG_OF: dict[str, str] = {}


def option(*flags: str, parameter: str | None = None, **settings: Any) -> Option:
    """A flag; ``parameter``: the library parameter it sets, entered in :data:`FLAG_OF`."""
    if parameter is not None:
        FLAG_OF.setdefault(parameter, flags[0])
    return Option(flags, settings, parameter)


Group = tuple[Option, ...]


def add_options(parser: argparse.ArgumentParser, groups: Iterable[Group]) -> None:
    for group in groups:
        for o in group:
            parser.add_argument(*o.flags, **o.settings)


def trait_names(args: argparse.Namespace, experiment: Experiment) -> tuple[str, ...]:
    """What ``--traits`` names: the experiment's traits for 'all'."""
    return experiment.traits if args.traits == "all" else tuple(args.traits.split(","))


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


# --- every command -------------------------------------------------------------------------------
EXPERIMENT = option("--experiment", default=DEFAULT_EXPERIMENT,
                    help="the experiment, a directory under --experiments-dir (default: "
                    "%(default)s)")  # fmt: skip
TRAITS = option("--traits", "--trait", default="all",
                help="comma-separated trait names, or 'all' (default)")  # fmt: skip
EXPERIMENTS_DIR = option("--experiments-dir", type=Path, default=None,
                         help="where experiments live (default: $TLEXTRACT_EXPERIMENTS or "
                         "./experiments)")  # fmt: skip
DEBUG = option("--debug", action="store_true",
               help="on a bug, print the full traceback here too (it is always saved to a log "
               "file)")  # fmt: skip

# --- what a run is, and how its model loads ------------------------------------------------------
MODEL = option("--model", parameter="model", default=None,
               help="override the experiment's model")  # fmt: skip
VARIANT = option("--variant", parameter="variant", default=None, choices=VARIANTS,
                 help="instruction: system-message instruction pairs; natural: prompts that "
                 "elicit each pole with no instruction (natural_pos.txt / natural_neg.txt) "
                 '(default: the experiment\'s "variant")')  # fmt: skip
ALL_VARIANTS = VARIANT.but(choices=(*VARIANTS, "all"),
                           help="instruction: system-message instruction pairs; natural: "
                           "prompts that elicit each pole with no instruction; all: both "
                           '(default: the experiment\'s "variant")')  # fmt: skip
ENGINE = option("--engine", parameter="engine", default=None, choices=ENGINE_KINDS,
                help="what generates the responses: tl (TransformerLens) or vllm (a vLLM server "
                "tlextract starts, or --vllm-url); default: the experiment's \"engine\", else "
                "tl")  # fmt: skip
JUDGE = option("--judge", parameter="judge", default=None, choices=JUDGE_OVERRIDES,
               help="override the experiment's judge: none keeps every response; local scores "
               "with the studied model itself")  # fmt: skip
# parameter: load_model's name for it, which the library's errors use.
MODEL_BACKEND = option("--model-backend", dest="model_backend", parameter="backend", default=None,
                       choices=MODEL_BACKENDS,
                       help="what builds the model: hooked (HookedTransformer, accelerated), "
                       "bridge (TransformerBridge around the transformers model), or auto: "
                       "hooked where it loads the model, else bridge (default: the "
                       "experiment's \"model_backend\", else auto)")  # fmt: skip
DEVICE = option("--device", parameter="device", default=None,
                help="cuda, cpu, ... (default: cuda if available)")  # fmt: skip
DTYPE = option("--dtype", parameter="dtype", default=DEFAULT_DTYPE, choices=DTYPE_CHOICES,
               help="model weights; pooling and vectors are always float32")  # fmt: skip
LAYER = option("--layer", parameter="layer", type=int, default=None, help="a block index")
FOLDS = option("--folds", parameter="folds", type=int, default=EVALUATION.folds,
               help="cross-validation folds (by example index)")  # fmt: skip

# --- the stage commands --------------------------------------------------------------------------
N_EXAMPLES = option("--n-examples", "--n_examples", parameter="n_examples", type=int,
                    default=None, help="responses per polarity")  # fmt: skip
BATCH_SIZE = option("--batch-size", "--batch_size", parameter="batch_size",
                    type=parse_batch_size, default=None,
                    help="prompts per batch (1: serial), or 'auto': the largest that fits "
                    "--memory-budget")  # fmt: skip
MEMORY_BUDGET = option("--memory-budget", parameter="memory_budget_gib", type=float,
                       default=None,
                       help="GiB that --batch-size auto may use beyond the weights (default: "
                       "half the available RAM on CPU, 80%% of free GPU memory)")  # fmt: skip
LAYERS = option("--layers", parameter="layers", type=parse_layers, default=None,
                help="'all', '16', '0,4,8' or '10-20' (TransformerLens block "
                "indices)")  # fmt: skip
MODE = option("--mode", parameter="mode", default="two-stage", choices=MODES,
              help="two-stage: a teacher-forced pass after generation; combined: record "
              "activations while generating (no second pass)")  # fmt: skip
VLLM_URL = option("--vllm-url", parameter="vllm_url", default=None,
                  help="a running vLLM server to generate with, e.g. http://127.0.0.1:8000/v1 "
                  "(implies --engine vllm)")  # fmt: skip
OFFLINE = option("--offline", action="store_true",
                 help="read hub models from the local Hugging Face cache only (sets "
                 "HF_HUB_OFFLINE=1)")  # fmt: skip
NO_WAIT = option("--no-wait", dest="no_wait", action="store_true",
                 help="if another run of the same trait is writing, exit (status 2) instead of "
                 "waiting")  # fmt: skip

COMMON: Group = (EXPERIMENT, TRAITS, EXPERIMENTS_DIR)
LOADING: Group = (MODEL, MODEL_BACKEND, DEVICE, DTYPE)
# What selects and overrides a trait run (every stage command and the report take these).
RUN: Group = (N_EXAMPLES, BATCH_SIZE, MEMORY_BUDGET, LAYERS, MODE, ENGINE, VLLM_URL,
              JUDGE, OFFLINE, NO_WAIT)  # fmt: skip
# The settings_for overrides of a stage command, by parameter (the run's outputs depend on them).
OVERRIDES = ("model", "model_backend", "n_examples", "layers", "mode", "dtype", "judge", "engine",
             "vllm_url")  # fmt: skip

REPORT: Group = (
    option("--methods", default=",".join(METHODS), help="comma-separated"),
    option("--test-fraction", type=float, default=EVALUATION.test_fraction),
    option("--seed", type=int, default=0, help="seed of the held-out split"),
    FOLDS.but(help="cross-validation folds (by example index), headline figures"),
    LAYER.but(help="cosine matrix layer (default: median cross-validated layer)"),
)
BACKEND: Group = (
    option("--backend", default="local", choices=("local", "ray"),
           help="local: one trait after another in this process; ray: one Ray task per "
           "(trait, variant) on every GPU (or CPU) of a Ray cluster (pip install "
           "'tlextract[ray]')"),
    option("--address", default=None,
           help="ray: the cluster to join (e.g. ray://head:10001 or auto; default: "
           "$RAY_ADDRESS, else a local Ray started for this command)"),
    option("--gpus-per-task", type=float, default=None,
           help="ray: GPUs per task, fractions allowed (default: 1 on a cluster with GPUs, "
           "else 0)"),
    option("--cpus-per-task", type=float, default=1.0, help="ray: CPUs per task"),
)  # fmt: skip


def flag_message(error: TLExtractError) -> str:
    """``error``'s message with each parameter it names shown as its flag: a leading
    ``batch_size`` as ``--batch-size``, ``device='tpu'`` as ``--device 'tpu'``, a value to
    pass, ``mode="two-stage"``, as ``--mode two-stage``, and ``force=True`` or a bare
    ``layers=`` as the flag alone."""
    text = str(error)
    for name in error.parameters:
        flag = FLAG_OF.get(name)
        if flag is None:
            continue
        text = re.sub(rf"^{name}(?![\w=])", flag, text)
        # name=True (a switch) and a bare name= (set it) are the flag alone
        text = re.sub(rf"(?<![\w.]){name}=(?:True\b|(?=[\s.,;)]|$))", flag, text)
        text = re.sub(rf'(?<![\w.]){name}=(?:"([^"\s]*)")?', _as_flag(flag), text)
    return text


def _as_flag(flag: str) -> Callable[[re.Match[str]], str]:
    return lambda m: f"{flag} {m.group(1)}" if m.group(1) else f"{flag} "
