"""One trait run's settings (the experiment's, after command-line overrides, all checked) and
every output path, decided here and nowhere else.

Layout under ``experiments/<exp>/``::

    <trait>/extraction[-natural][-<model>]/   one trait run (variant and model other than the
        responses/ judge/ activations/        experiment's get their own directory)
        vectors/ report/ steer/
        compare-<other>/                      the run against another model (compare_dir)
    report[-<model>]/                         the experiment's report (and Ray run summaries)
    monitor[-natural][-<model>]/              per-token monitoring pages
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch

from tlextract.config import (
    ENGINE_KINDS,
    ENGINES,
    MODEL_BACKENDS,
    EngineSettings,
    Experiment,
    split_judge,
)
from tlextract.errors import TLExtractError
from tlextract.traits import VARIANTS, Trait, Variant

STAGES = ("responses", "judge", "activations", "vectors")  # each writes out_dir/<stage>/
Mode = Literal["two-stage", "combined"]
MODES: tuple[Mode, ...] = ("two-stage", "combined")
DTYPES = ("float32", "bfloat16", "float16")
# "auto": bfloat16 on CUDA (half the memory of float32), float32 elsewhere (so every CPU result
# and cache key stays what it was). Resolved in settings_for, where the run's settings are made.
AUTO_DTYPE = "auto"
DTYPE_CHOICES = (AUTO_DTYPE, *DTYPES)
DEFAULT_DTYPE = AUTO_DTYPE
# What a run's ``judge`` override makes of the experiment's judge block (its keep rules stay).
_JUDGE_OVERRIDES: dict[str, dict[str, Any]] = {
    "none": {"kind": "none"},  # keep every response
    "local": {"kind": "local", "model": "self"},  # scored by the studied model itself
}
JUDGE_OVERRIDES = tuple(_JUDGE_OVERRIDES)


@dataclass(frozen=True)
class RunSettings:
    """Everything one trait run depends on, after command-line overrides."""

    experiment: Experiment
    trait: Trait
    model: str
    n_examples: int
    batch_size: int | Literal["auto"]
    layers: tuple[int, ...] | Literal["all"]
    device: str | None = None
    dtype: str = DTYPES[0]  # resolved: settings_for turns "auto" into the device's dtype
    mode: Mode = "two-stage"
    variant: Variant = "instruction"
    judge: dict[str, Any] = field(default_factory=lambda: {"kind": "none"})
    memory_budget_gib: float | None = None  # for batch_size "auto"; None: memory.default_budget
    engine: EngineSettings = field(default_factory=EngineSettings)
    model_backend: str = "auto"  # config.MODEL_BACKENDS: what builds the model
    # A judge object the caller passed (settings_for(judge=...)); its name is in ``judge``, so
    # in the judge stage's key.
    judge_given: Any = field(default=None, compare=False, repr=False)

    @property
    def out_dir(self) -> Path:
        """``trait_dir``, with the engine's suffix (``-vllm`` when vLLM generates), so the
        engines' runs sit side by side instead of replacing each other."""
        out = trait_dir(self.experiment, self.trait.name, self.model, self.variant)
        return out.with_name(out.name + ENGINES[self.engine.kind].dir_suffix)

    def stage_dir(self, stage: str) -> Path:
        return self.out_dir / stage


def settings_for(
    experiment: Experiment,
    trait: str,
    *,
    model: str | None = None,
    n_examples: int | None = None,
    batch_size: int | Literal["auto"] | None = None,
    layers: Sequence[int] | Literal["all"] | None = None,
    device: str | None = None,
    dtype: str = DEFAULT_DTYPE,
    mode: Mode = "two-stage",
    variant: Variant | None = None,
    judge: Literal["none", "local"] | Any | None = None,
    memory_budget_gib: float | None = None,
    engine: str | None = None,
    vllm_url: str | None = None,
    model_backend: str | None = None,
) -> RunSettings:
    """Settings for one trait; arguments left as None take the experiment's. ``judge`` switches
    the experiment's judge off ("none"), to the studied model itself ("local"), or to a judge
    object of the caller's (a ``tlextract.judge.base.Judge``: a ``name`` and ``score``).
    ``batch_size="auto"`` picks the largest batch that fits ``memory_budget_gib``. ``engine``
    (one of ``config.ENGINE_KINDS``) replaces the experiment's engine kind; ``vllm_url`` is a
    running vLLM server to use (implies engine "vllm"). ``model_backend`` ("auto", "hooked",
    "bridge") replaces the experiment's: what builds the model (``tlextract.load_model``)."""
    _check_sizes(n_examples, batch_size, memory_budget_gib)
    if mode not in MODES:
        raise TLExtractError(f"mode={mode!r} is not a mode; use one of {', '.join(MODES)}.",
                             parameters=("mode",))  # fmt: skip
    variant = variant or experiment.variant
    if variant not in VARIANTS:
        raise TLExtractError(f"variant={variant!r} is unknown; use one of "
                             f"{', '.join(VARIANTS)}.", parameters=("variant",))  # fmt: skip
    if model is not None and not model.strip():
        raise TLExtractError('model must name a model, e.g. model="smollm2-135m-instruct".',
                             parameters=("model",))  # fmt: skip
    check_device(device)
    return RunSettings(
        experiment=experiment,
        trait=experiment.trait(trait),
        model=model or experiment.model,
        model_backend=_model_backend(model_backend or experiment.model_backend),
        n_examples=n_examples or experiment.n_examples,
        batch_size=batch_size or experiment.batch_size,
        layers=experiment.layers
        if layers is None
        else ("all" if layers == "all" else tuple(sorted(set(layers)))),
        device=device,
        dtype=resolve_dtype(dtype, device),
        mode=mode,
        variant=variant,
        judge=_judge_override(experiment.judge, judge),
        judge_given=None if judge is None or isinstance(judge, str) else judge,
        memory_budget_gib=memory_budget_gib,
        engine=_engine_override(experiment.engine, engine, vllm_url, mode),
    )


def _check_sizes(
    n_examples: int | None,
    batch_size: int | Literal["auto"] | None,
    memory_budget_gib: float | None,
) -> None:
    for name, value in (("n_examples", n_examples), ("batch_size", batch_size)):
        if value is not None and value != "auto" and (not _int(value) or value < 1):
            extra = " or 'auto'" if name == "batch_size" else ""
            raise TLExtractError(
                f"{name} must be an integer of at least 1{extra} (got {value!r}).",
                parameters=(name,),
            )
    if memory_budget_gib is not None and not memory_budget_gib > 0:
        raise TLExtractError(
            f"memory_budget_gib must be a positive number of GiB (got {memory_budget_gib}).",
            parameters=("memory_budget_gib",),
        )


def _engine_override(
    config: EngineSettings, kind: str | None, url: str | None, mode: Mode
) -> EngineSettings:
    chosen = _engine_choice(config, kind, url)
    if mode == "combined" and not ENGINES[chosen.kind].captures:
        raise TLExtractError(
            f'mode="combined" records activations while the engine generates; with engine='
            f'"{chosen.kind}" they come from the teacher-forced pass: use mode="two-stage" (the '
            "default).",
            parameters=("mode", "engine"),
        )
    return chosen


def _engine_choice(config: EngineSettings, kind: str | None, url: str | None) -> EngineSettings:
    if kind is not None and kind not in ENGINE_KINDS:
        raise TLExtractError(f"engine={kind!r}: use one of {', '.join(ENGINE_KINDS)}.",
                             parameters=("engine",))  # fmt: skip
    if url is not None:
        if kind is not None and not ENGINES[kind].served:
            raise TLExtractError('vllm_url names a vLLM server: use it with engine="vllm".',
                                 parameters=("vllm_url", "engine"))  # fmt: skip
        if not url.startswith(("http://", "https://")):
            raise TLExtractError(
                f"vllm_url={url!r}: give the server's URL, e.g. http://127.0.0.1:8000/v1.",
                parameters=("vllm_url",),
            )
        return replace(config, kind="vllm", base_url=url)  # what the parameter names
    return config if kind is None else replace(config, kind=kind)  # type: ignore[arg-type]


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _judge_override(config: dict[str, Any], override: Any) -> dict[str, Any]:
    if override is None:
        return config
    if not isinstance(override, str):
        if not (isinstance(getattr(override, "name", None), str) and callable(
                getattr(override, "score", None))):  # fmt: skip
            raise TLExtractError(f"judge={override!r}: a judge object needs a name (str) and a "
                                 "score(prompts) method.", parameters=("judge",))  # fmt: skip
        return {"kind": "given", "name": override.name, **split_judge(config)[1]}
    if override not in _JUDGE_OVERRIDES:
        raise TLExtractError(f"judge={override!r}: use one of {', '.join(JUDGE_OVERRIDES)} (or "
                             "None: the experiment's).", parameters=("judge",))  # fmt: skip
    return {**_JUDGE_OVERRIDES[override], **split_judge(config)[1]}


def pick_device(device: str | None) -> str:
    """``device``, or for None the one a model loads on: cuda when available, else cpu."""
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(dtype: str, device: str | None) -> str:
    """``dtype``, or for "auto" bfloat16 on CUDA and float32 on any other device."""
    if dtype not in DTYPE_CHOICES:
        raise TLExtractError(f"dtype={dtype!r} is unknown; use one of "
                             f"{', '.join(DTYPE_CHOICES)}.", parameters=("dtype",))  # fmt: skip
    if dtype != AUTO_DTYPE:
        return dtype
    return "bfloat16" if torch.device(pick_device(device)).type == "cuda" else "float32"


def _model_backend(backend: str) -> str:
    if backend not in MODEL_BACKENDS:
        raise TLExtractError(
            f"model_backend={backend!r} is not a backend; use one of {', '.join(MODEL_BACKENDS)}.",
            parameters=("model_backend",),
        )
    return backend


def check_device(device: str | None) -> None:
    """A device this machine has: cpu, cuda or cuda:N (present), mps (present), or None."""
    if device is None or device == "cpu":
        return
    match = re.fullmatch(r"cuda(?::(\d+))?", device)
    if match:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise TLExtractError(
                f"device={device}: this machine has no CUDA GPU (or this torch build has no "
                'CUDA). Use device="cpu", or no device to pick one.',
                parameters=("device",),
            )
        index = int(match.group(1) or 0)
        if index >= count:
            raise TLExtractError(f"device={device}: only cuda:0 to cuda:{count - 1} exist here. "
                                 "Pick one of them.", parameters=("device",))  # fmt: skip
        return
    if device == "mps":
        if not torch.backends.mps.is_available():
            raise TLExtractError("device=mps: Apple's MPS is not available here. Use cpu.",
                                 parameters=("device",))  # fmt: skip
        return
    raise TLExtractError(
        f"device={device!r} is not a device tlextract knows; use cpu, cuda, cuda:N or mps.",
        parameters=("device",),
    )


# --- output paths --------------------------------------------------------------------------------


def _suffix(experiment: Experiment, model: str | None, variant: Variant) -> str:
    suffix = "" if variant == "instruction" else f"-{variant}"
    if model not in (None, experiment.model):
        suffix += "-" + str(model).replace("/", "_")
    return suffix


def trait_dir(
    experiment: Experiment, trait: str, model: str | None = None, variant: Variant = "instruction"
) -> Path:
    """Results of one trait: ``extraction``, with ``-natural`` for the natural variant and
    ``-<model>`` for a model other than the experiment's, so no run overwrites another."""
    return experiment.path / trait / f"extraction{_suffix(experiment, model, variant)}"


def report_dir(run: RunSettings) -> Path:
    """One trait run's held-out evaluation."""
    return run.out_dir / "report"


def steer_dir(run: RunSettings) -> Path:
    return run.out_dir / "steer"


def experiment_report_dir(experiment: Experiment, model: str | None = None) -> Path:
    """``<exp>/report``, or ``<exp>/report-<model>`` for a model other than the experiment's."""
    other = model not in (None, experiment.model)
    return experiment.path / (f"report-{str(model).replace('/', '_')}" if other else "report")


def monitor_dir(run: RunSettings) -> Path:
    return run.experiment.path / f"monitor{_suffix(run.experiment, run.model, run.variant)}"


def compare_dir(run: RunSettings, other: str) -> Path:
    """The run compared with ``other`` (``python -m tlextract compare``): ``compare-<other>``,
    a directory named by its last component and a hash of its resolved path (two checkpoints
    called ``final`` stay apart), any other name with ``/`` as ``_``."""
    path = Path(other).expanduser()
    if path.is_dir():
        resolved = path.resolve()
        digest = hashlib.sha256(str(resolved).encode()).hexdigest()[:8]
        return run.out_dir / f"compare-{resolved.name}-{digest}"
    return run.out_dir / f"compare-{other.replace('/', '_')}"


def screen_dir(run: RunSettings, data: str) -> Path:
    """``screen`` of the data file or directory named ``data``: the model's own responses and
    the projection differences (all traits of one call)."""
    return run.experiment.path / f"screen{_suffix(run.experiment, run.model, run.variant)}" / data
