"""``experiments/<name>/experiment.json``: loaded into validated settings, every setting checked
before a model loads or a file is written.

An experiment either holds its trait directories itself or names another experiment's with
``traits_from``, so one fix to a trait reaches every experiment that uses it. Layers are
TransformerLens block indices; ``hook`` is the block hook read at each of them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tlextract.errors import TLExtractError
from tlextract.inputs import PathArg, read_json, require, require_directory
from tlextract.traits import VARIANTS, Trait, Variant, load_trait

DEFAULT_EXPERIMENT = "smollm2_cognitive"
# Block hooks with one d_model vector per token, the residual stream and what adds to it.
HOOKS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
DEFAULT_HOOK = "resid_post"  # an experiment's hook unless it says otherwise
PROMPT_STYLES = ("chat", "completion")

# The judge block: its kind, each kind's options (and their types), and the keep rule.
JUDGE_KINDS = ("none", "local", "openai")
SCORE_THRESHOLD = 50.0
DEFAULT_MIN_MASS = 0.25


@dataclass(frozen=True)
class EndpointDefaults:
    """An OpenAI-compatible endpoint's defaults (the openai judge; drafting a trait), defined
    once: :class:`tlextract.judge.chat.ChatEndpoint` and the judge read them."""

    api_key_env: str | None = "OPENAI_API_KEY"
    timeout: float = 30.0  # seconds per request
    max_retries: int = 5
    backoff_base: float = 1.0
    backoff_max: float = 60.0
    max_concurrency: int = 8  # the judge's requests in flight
    top_logprobs: int = 20


ENDPOINT = EndpointDefaults()
KEEP_RULES: dict[str, float | int] = {
    "threshold": SCORE_THRESHOLD,
    "min_coherence": SCORE_THRESHOLD,
    "min_kept": 4,
}
_JUDGE_OPTIONS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "none": {},
    "local": {"model": str, "batch_size": int, "min_mass": (int, float), "chat": bool,
              "packed": bool},
    # api_key_env null: a keyless server (a local vLLM), no Authorization header is sent.
    "openai": {"base_url": str, "model": str, "api_key_env": (str, type(None)),
               "max_concurrency": int,
               "timeout": (int, float), "max_retries": int, "min_mass": (int, float),
               "backoff_base": (int, float), "backoff_max": (int, float), "top_logprobs": int},
}  # fmt: skip
_JUDGE_REQUIRED: dict[str, tuple[str, ...]] = {"openai": ("base_url", "model")}


ROOT_VARIABLE = "TLEXTRACT_EXPERIMENTS"


def experiments_root() -> Path:
    """``$TLEXTRACT_EXPERIMENTS`` or ./experiments."""
    return Path(os.environ.get(ROOT_VARIABLE, "experiments"))


@dataclass(frozen=True)
class EvaluationDefaults:
    """The evaluation's defaults, defined here once: every signature and flag reads them."""

    test_fraction: float = 0.25  # held-out share of the one-split (descriptive) evaluation
    folds: int = 5  # nested cross-validation's outer folds (by example index)
    n_boot: int = 2000  # bootstrap resamples behind every 95% interval


EVALUATION = EvaluationDefaults()


@dataclass(frozen=True)
class GenerationSettings:
    # Numbers stay as written in experiment.json (1 or 1.0): they are part of the cache key.
    max_new_tokens: int = 40
    temperature: float | int = 1.0
    top_p: float | int | None = None
    do_sample: bool = True


@dataclass(frozen=True)
class EngineKind:
    """What the layers below :mod:`tlextract.engines` know of an engine kind, declared once here;
    the engines' code, and the one choice between them, are in engines/ (``registry``)."""

    served: bool  # generates in a server process, which a URL can name (``vllm_url``)
    captures: bool  # can record activations while it generates (mode "combined")
    dir_suffix: str  # after a run's directory name, so the engines' runs sit side by side


ENGINES = {
    # TransformerLens keeps the directory runs had before there were engines.
    "tl": EngineKind(served=False, captures=True, dir_suffix=""),
    "vllm": EngineKind(served=True, captures=False, dir_suffix="-vllm"),
}
ENGINE_KINDS = tuple(ENGINES)
MODEL_BACKENDS = ("auto", "hooked", "bridge")  # what builds the model (tlextract.model.source)


@dataclass(frozen=True)
class EngineSettings:
    """What generates the responses. ``tl``: TransformerLens (combined or two-stage). ``vllm``: a
    vLLM server, started by tlextract for the generate stage (``base_url`` None) or already
    running at ``base_url``; the activations then come from the teacher-forced TransformerLens
    pass, so the vectors are read from the same hook names either way."""

    kind: Literal["tl", "vllm"] = "tl"
    base_url: str | None = None  # e.g. http://127.0.0.1:8000/v1
    python: str | None = None  # a Python with vLLM; None: $TLEXTRACT_VLLM_PYTHON, this one
    served_model: str | None = None  # the model name the server answers to; None: the run's
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float | None = None  # None: 0.25 on a CPU (of RAM), 0.85 on a GPU
    enforce_eager: bool = False  # skip vLLM's compilation: a faster start, slower decoding
    startup_timeout: float | int = 900
    request_timeout: float | int = 600


_ENGINE_TYPES: dict[str, type | tuple[type, ...]] = {
    "kind": str, "base_url": str, "python": str, "served_model": str,
    "tensor_parallel_size": int, "gpu_memory_utilization": (int, float), "enforce_eager": bool,
    "startup_timeout": (int, float), "request_timeout": (int, float),
}  # fmt: skip
_ENGINE_NULLABLE = ("base_url", "python", "served_model", "gpu_memory_utilization")


def validate_engine(engine: Any, where: Path | str) -> EngineSettings:
    """``"tl"``, ``"vllm"`` or an object of EngineSettings' fields, checked."""
    if isinstance(engine, str):
        engine = {"kind": engine}
    require(isinstance(engine, dict), where, "engine",
            'must be "tl", "vllm" or an object, e.g. {"kind": "vllm"}.')  # fmt: skip
    kind = engine.get("kind", "tl")
    require(kind in ENGINE_KINDS, where, "engine.kind",
            f"is {kind!r}; use one of {', '.join(ENGINE_KINDS)}.")  # fmt: skip
    for key, value in engine.items():
        require(key in _ENGINE_TYPES, where, f"engine.{key}", "is an unknown key; valid keys: "
                f"{', '.join(_ENGINE_TYPES)}.")  # fmt: skip
        optional = value is None and key in _ENGINE_NULLABLE
        require(optional or _is(value, _ENGINE_TYPES[key]), where, f"engine.{key}",
                f"must be {_type_name(_ENGINE_TYPES[key])} (got {value!r}).")  # fmt: skip
    for key in ("tensor_parallel_size", "startup_timeout", "request_timeout"):
        require(key not in engine or engine[key] > 0, where, f"engine.{key}",
                f"must be above 0 (got {engine.get(key)!r}).")  # fmt: skip
    share = engine.get("gpu_memory_utilization")
    require(share is None or 0 < share < 1, where, "engine.gpu_memory_utilization",
            f"must be a fraction between 0 and 1 (got {share!r}).")  # fmt: skip
    url = engine.get("base_url")
    require(url is None or url.startswith(("http://", "https://")), where, "engine.base_url",
            f"must be an http(s) URL such as http://127.0.0.1:8000/v1 (got {url!r}).")  # fmt: skip
    return EngineSettings(**engine)


@dataclass(frozen=True)
class Experiment:
    name: str
    path: Path
    model: str
    model_backend: str = "auto"  # one of MODEL_BACKENDS
    layers: tuple[int, ...] | Literal["all"] = "all"
    hook: str = DEFAULT_HOOK
    prompt_style: Literal["chat", "completion"] = "chat"
    n_examples: int = 20
    batch_size: int | Literal["auto"] = 8
    seed: int = 0
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    judge: dict[str, Any] = field(default_factory=lambda: {"kind": "none"})
    traits: tuple[str, ...] = ()
    variant: Variant = "instruction"  # what a run uses unless told otherwise
    traits_from: str | None = None
    engine: EngineSettings = field(default_factory=EngineSettings)

    @property
    def config_path(self) -> Path:
        return self.path / "experiment.json"

    @property
    def traits_dir(self) -> Path:
        """Where the trait directories live (this experiment's, or the one named by traits_from)."""
        return self.path.parent / self.traits_from if self.traits_from else self.path

    def trait(self, name: str) -> Trait:
        if name not in self.traits:
            raise TLExtractError(
                f"{self.config_path}: unknown trait '{name}'. "
                f"This experiment has: {', '.join(self.traits)}."
            )
        return load_trait(self.traits_dir / name, natural_dir=self.path / name)


_EXPERIMENT_KEYS = {f for f in Experiment.__dataclass_fields__ if f not in ("name", "path")}
_GENERATION_KEYS = set(GenerationSettings.__dataclass_fields__)


def split_judge(config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the judge's own settings, the keep rule) from an experiment's judge block."""
    judge = {k: v for k, v in config.items() if k not in KEEP_RULES}
    rules = {k: config.get(k, v) for k, v in KEEP_RULES.items()}
    return judge, rules


def _is(value: Any, kind: type | tuple[type, ...]) -> bool:
    # bool is an int to Python, never to a setting
    return isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool)


def validate_judge(config: Any, where: Path | str, name: str = "judge") -> dict[str, Any]:
    """The judge block, checked: its kind, each option's name and type, what a kind requires,
    and the keep rule. Returned unchanged (it is part of the judge stage's cache key)."""
    require(isinstance(config, dict), where, name, 'must be an object, e.g. {"kind": "none"}.')
    options, rules = split_judge(config)
    kind = str(options.get("kind"))
    require(kind in JUDGE_KINDS, where, f"{name}.kind",
            f"is {options.get('kind')!r}; valid kinds: {', '.join(JUDGE_KINDS)}.")  # fmt: skip
    allowed = _JUDGE_OPTIONS[kind]
    for key, value in options.items():
        if key == "kind":
            continue
        require(key in allowed, where, f"{name}.{key}", f"is an unknown key for a {kind!r} judge; "
                f"valid keys: {', '.join(sorted(allowed)) or 'none'}.")  # fmt: skip
        require(_is(value, allowed[key]), where, f"{name}.{key}",
                f"must be {_type_name(allowed[key])} (got {value!r}).")  # fmt: skip
    for key in _JUDGE_REQUIRED.get(kind, ()):
        require(bool(options.get(key)), where, f"{name}.{key}",
                f'is required for a {kind!r} judge, e.g. "base_url": "https://api.openai.com/v1",'
                ' "model": "gpt-4.1-mini".')  # fmt: skip
    for key in ("threshold", "min_coherence"):
        value = rules[key]
        require(_is(value, (int, float)) and 0 <= value <= 100, where, f"{name}.{key}",
                f"must be a score between 0 and 100 (got {value!r}).")  # fmt: skip
    require(_is(rules["min_kept"], int) and rules["min_kept"] >= 1, where, f"{name}.min_kept",
            f"must be a positive integer (got {rules['min_kept']!r}).")  # fmt: skip
    return config


def _type_name(kind: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    name = "a number" if float in kinds else names[kinds[0]]
    return f"{name} or null" if type(None) in kinds else name


def validate_generation(gen: Any, where: Path) -> GenerationSettings:
    require(
        isinstance(gen, dict) and not set(gen) - _GENERATION_KEYS,
        where,
        "generation",
        f"must be an object with keys among {', '.join(sorted(_GENERATION_KEYS))}.",
    )
    defaults = GenerationSettings()
    do_sample = gen.get("do_sample", defaults.do_sample)
    require(_is(do_sample, bool), where, "generation.do_sample", "must be true or false.")
    n = gen.get("max_new_tokens", defaults.max_new_tokens)
    require(
        _is(n, int) and n >= 1,
        where,
        "generation.max_new_tokens",
        f"must be an integer of at least 1 (got {n!r}).",
    )
    temp = gen.get("temperature", defaults.temperature)
    require(
        _is(temp, (int, float)) and (temp > 0 or not do_sample),
        where,
        "generation.temperature",
        f"must be a number above 0 when sampling (got {temp!r}); for greedy decoding set "
        '"do_sample": false.',
    )
    top_p = gen.get("top_p", defaults.top_p)
    require(
        top_p is None or (_is(top_p, (int, float)) and 0 < top_p <= 1),
        where,
        "generation.top_p",
        f"must be above 0 and at most 1, or null (got {top_p!r}).",
    )
    return GenerationSettings(**gen)  # fmt: skip


def load_experiment(name: str, root: PathArg | None = None) -> Experiment:
    """Load and validate ``<root>/<name>/experiment.json`` (root: ``experiments_root()``)."""
    if root is None:
        root, arg = experiments_root(), f"${ROOT_VARIABLE}" if ROOT_VARIABLE in os.environ else ""
    else:
        root, arg = Path(root), "load_experiment(root=...)"
    require_directory(root, arg, "the experiment directories")
    path = root / name / "experiment.json"
    if not path.exists():
        known = sorted(p.parent.name for p in root.glob("*/experiment.json"))
        raise TLExtractError(
            f"{path}: unknown experiment '{name}'. Known experiments in {root}: "
            f"{', '.join(known) or 'none'}."
        )
    data = read_json(path)
    require(isinstance(data, dict), path, "<top level>", "must be a JSON object.")
    unknown = sorted(set(data) - _EXPERIMENT_KEYS)
    require(
        not unknown,
        path,
        unknown[0] if unknown else "",
        f"is not a known setting. Known settings: {', '.join(sorted(_EXPERIMENT_KEYS))}.",
    )
    _check_fields(data, path)
    # What the file leaves out takes the Experiment dataclass's default (defined there only).
    checked: dict[str, Callable[[Any, Path], Any]] = {
        "layers": _layers, "generation": validate_generation, "judge": validate_judge,
        "engine": validate_engine, "traits": lambda traits, _: tuple(traits),
    }  # fmt: skip
    given = {k: checked[k](v, path) if k in checked else v for k, v in data.items()}
    if given["model"].startswith(("./", "../")):  # relative to the experiment, wherever we run
        given["model"] = os.path.abspath(path.parent / given["model"])  # a symlink keeps its name
    exp = Experiment(name=name, path=path.parent, **given)
    _check_traits(exp, root, path)
    return exp


def _layers(layers: Any, path: Path) -> tuple[int, ...] | Literal["all"]:
    if layers == "all":
        return "all"
    require(isinstance(layers, list) and len(layers) > 0
            and all(_is(x, int) and x >= 0 for x in layers), path, "layers",
            'must be "all" or a non-empty list of block indices (0-based).')  # fmt: skip
    return tuple(sorted(set(layers)))


def _check_fields(data: dict[str, Any], path: Path) -> None:
    require(
        isinstance(data.get("model"), str) and bool(data["model"]),
        path,
        "model",
        'must name a model, e.g. "smollm2-135m-instruct".',
    )
    require(data.get("model_backend", "auto") in MODEL_BACKENDS, path, "model_backend",
            f"must be one of {', '.join(MODEL_BACKENDS)}: what builds the model (auto: "
            "HookedTransformer where it loads the model, else TransformerBridge).")  # fmt: skip
    hook = data.get("hook", "resid_post")
    require(
        hook in HOOKS,
        path,
        "hook",
        f"must be one of {', '.join(HOOKS)} (got {hook!r}): the block hook "
        "blocks.{layer}.hook_<hook> read at each layer.",
    )
    require(
        data.get("prompt_style", "chat") in PROMPT_STYLES,
        path,
        "prompt_style",
        'must be "chat" (chat template) or "completion" (plain Q/A text).',
    )
    for key in ("n_examples", "batch_size", "seed"):
        if key in data and not (key == "batch_size" and data[key] == "auto"):
            require(
                _is(data[key], int) and data[key] >= (0 if key == "seed" else 1),
                path,
                key,
                "must be a positive integer" + (' or "auto".' if key == "batch_size" else "."),
            )
    require(
        data.get("variant", "instruction") in VARIANTS,
        path,
        "variant",
        f"must be one of {', '.join(VARIANTS)}.",
    )
    traits_from = data.get("traits_from")
    require(
        traits_from is None or (isinstance(traits_from, str) and bool(traits_from)),
        path,
        "traits_from",
        "must name an experiment directory.",
    )
    traits = data.get("traits", [])
    require(isinstance(traits, list) and len(traits) > 0
            and all(isinstance(t, str) and t for t in traits), path,
            "traits", "must list at least one trait directory name.")  # fmt: skip


def _check_traits(exp: Experiment, root: Path, path: Path) -> None:
    """Every named trait exists and loads (definition and natural prompt files)."""
    if exp.traits_from is not None:
        require((root / exp.traits_from).is_dir(), path, "traits_from",
                f"names {exp.traits_from!r}, which is not a directory in {root}. "
                "Name an experiment that holds the trait directories.")  # fmt: skip
    for t in exp.traits:
        if not (exp.traits_dir / t / "trait_definition.json").exists():
            raise TLExtractError(
                f"{path}: trait '{t}' has no {exp.traits_dir / t / 'trait_definition.json'}. "
                "Create it or remove the trait from 'traits'."
            )
        load_trait(exp.traits_dir / t, natural_dir=exp.path / t)
