"""Whether saved vectors fit a model, and whether two models are one family: the checks every
command that puts a run's vectors on a model it was not made with makes first (``compare``,
``screen``). Each failure is one line (:class:`TLExtractError`) naming the models and what differs.

* :func:`check_layers`: every asked layer is among the vectors'.
* :func:`check_fit` (a loaded model) and :func:`check_config_fit` (a model name, from its
  config.json alone, before any weights load): the vectors are as wide as the model's residual
  stream, and every asked layer is among the vectors' and the model's blocks.
* :func:`check_same_family` (two loaded models) and :func:`check_config_family` (two names, from
  config.json where it is cheap to read): same architecture, width, depth and vocabulary, as
  a fine-tune of a base has (the same token ids go through both).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import astuple, dataclass, fields
from pathlib import Path

from tlextract.errors import TLExtractError
from tlextract.model import hub
from tlextract.model.decoding import Model
from tlextract.model.load import model_directory, model_info
from tlextract.model.source import ADAPTER_CONFIG, resolve_model
from tlextract.ops.trait_vectors import TraitVectors


@dataclass(frozen=True)
class Shape:
    """What a model is, as far as sharing vectors and token ids goes."""

    architecture: str
    d_model: int
    n_layers: int
    d_vocab: int


def shape_of(model: Model) -> Shape:
    info = model_info(model)
    return Shape(str(info["architecture"]), info["d_model"], info["n_layers"], info["d_vocab"])


def config_shape(name: str) -> Shape | None:
    """The :class:`Shape` that ``name``'s config.json says, read without loading weights: a
    local directory's, a LoRA adapter's base's, an unlisted hub id's (its config alone, a few
    kB), an embedded model's (from its cache, built first if missing). None for TransformerLens
    names (downloaded whole) and a config transformers cannot read: check the loaded model."""
    from transformers import AutoConfig

    source = resolve_model(name, fetch_weights=False)
    if source.adapter is not None:
        base = json.loads((source.adapter / ADAPTER_CONFIG).read_text())
        return config_shape(str(base["base_model_name_or_path"]))
    if source.kind == "embedded":
        directory = model_directory(name)
    elif source.kind == "local":
        directory = Path(name).expanduser()
    elif source.kind == "hub" and source.tl_name is None:
        directory = hub.fetch_config(name)
    else:
        return None
    try:
        raw = json.loads((directory / "config.json").read_text())
        config = AutoConfig.from_pretrained(str(directory), local_files_only=True).get_text_config()
        arch = (raw.get("architectures") or [""])[0]
        return Shape(arch, config.hidden_size, config.num_hidden_layers, config.vocab_size)
    except (OSError, ValueError, KeyError, AttributeError):
        return None  # the loaded model is checked instead


def check_layers(vectors: TraitVectors, layers: Sequence[int] | None = None) -> tuple[int, ...]:
    """``layers`` (default: all the vectors have), once checked to be among the vectors'."""
    asked = tuple(vectors.layers if layers is None else layers)
    missing = [layer for layer in asked if layer not in vectors.layers]
    if missing:
        raise TLExtractError(
            f"the {vectors.trait} vectors (made on {vectors.model}) have no layer "
            f"{', '.join(map(str, missing))}; they have {list(vectors.layers)}. Ask for those "
            "layers, or extract at all of them."
        )
    return asked


def _fit(label: str, d_model: int, n_layers: int, vectors: TraitVectors,
         layers: Sequence[int] | None) -> tuple[int, ...]:  # fmt: skip
    width = vectors.vectors.shape[-1]
    made = f"the {vectors.trait} vectors (made on {vectors.model})"
    if width != d_model:
        raise TLExtractError(
            f"{made} are {width} wide but {label} has d_model {d_model}: they belong to "
            "another model family; extract vectors on this model first."
        )
    asked = check_layers(vectors, layers)
    beyond = [layer for layer in asked if not 0 <= layer < n_layers]
    if beyond:
        raise TLExtractError(
            f"{made} have layer {', '.join(map(str, beyond))} but {label} has blocks "
            f"0..{n_layers - 1}: they belong to another model family."
        )
    return asked


def check_fit(
    model: Model, vectors: TraitVectors, layers: Sequence[int] | None = None
) -> tuple[int, ...]:
    """``layers`` (default: all the vectors have), once checked: ``vectors`` are as wide as
    ``model``'s residual stream and have every one of them, and ``model`` has those blocks.
    Raises :class:`TLExtractError` (one line) otherwise."""
    return _fit(model.cfg.model_name, model.cfg.d_model, model.cfg.n_layers, vectors, layers)


def check_config_fit(
    name: str, vectors: TraitVectors, layers: Sequence[int] | None = None
) -> tuple[int, ...] | None:
    """:func:`check_fit` from ``name``'s config.json before it loads; None where the config is
    not cheap to read (:func:`config_shape`): check the loaded model then."""
    shape = config_shape(name)
    return None if shape is None else _fit(name, shape.d_model, shape.n_layers, vectors, layers)


def _same(base: str, a: Shape, other: str, b: Shape) -> None:
    for f, x, y in zip(fields(Shape), astuple(a), astuple(b), strict=True):
        if x != y:
            raise TLExtractError(
                f"{other} is not of {base}'s model family: its {f.name} is {y}, {base}'s is "
                f"{x}; compare a fine-tune (or adapter) of {base} with it."
            )


def check_same_family(base: Model, other: Model) -> None:
    """``other`` is of ``base``'s family: same architecture, d_model, number of blocks and
    vocabulary (the tokenizers map every token to the same id). One line otherwise."""
    a, b = base.cfg.model_name, other.cfg.model_name
    _same(a, shape_of(base), b, shape_of(other))
    if base.tokenizer is not None and other.tokenizer is not None:
        if base.tokenizer.get_vocab() != other.tokenizer.get_vocab():
            raise TLExtractError(
                f"{b} is not of {a}'s model family: its tokenizer maps tokens to other ids; "
                f"compare a fine-tune (or adapter) of {a} with it."
            )


def check_config_family(base: str, other: str) -> None:
    """:func:`check_same_family` from the two config.json files, where both are cheap to read
    (:func:`config_shape`); nothing is checked otherwise (check the loaded models then)."""
    a, b = config_shape(base), config_shape(other)
    if a is not None and b is not None:
        _same(base, a, other, b)
