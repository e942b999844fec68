"""What the accelerator was tested with, and what each fast forward expects of its component.

A fast forward recomputes what TransformerLens' forward computes, so it is right only for the
TransformerLens it was checked against. When the installed TransformerLens or torch release is
not in :data:`TESTED`, a self-check on a tiny model decides (selfcheck.py). :func:`accelerate`
leaves a component stock when its stock ``forward`` takes other arguments than the fast one, or
when a parameter, hook point, submodule or configuration field the fast forward reads is missing
or shaped otherwise. Either way one warning says what did not match, and the model computes
TransformerLens' own numbers (only slower).
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import version

import torch
from torch import nn
from transformer_lens import HookedTransformerConfig

log = logging.getLogger(__name__)

# Releases the fast forwards were tested against; a local build tag (torch's "+cpu", "+cu128")
# does not count. To add one: add it here, then tests/test_fast.py, tests/test_accel.py and the
# fast/stock suites (test_models, test_generation, test_activations) must pass on it.
TESTED: dict[str, tuple[str, ...]] = {"transformer-lens": ("3.9.0",), "torch": ("2.13.0",)}

_warned: set[str] = set()


def installed() -> dict[str, str]:
    """The installed versions of the packages in :data:`TESTED`."""
    return {"transformer-lens": version("transformer-lens"), "torch": torch.__version__}


def untested_versions() -> list[str]:
    """``"torch 2.14.0 (tested: 2.13.0)"`` for each installed package not in :data:`TESTED`."""
    return [
        f"{package} {v} (tested: {', '.join(TESTED[package])})"
        for package, v in installed().items()
        if v.split("+", 1)[0] not in TESTED[package]
    ]


def warn_once(message: str) -> None:
    """Log ``message`` as a warning the first time this process sees it."""
    if message not in _warned:
        _warned.add(message)
        log.warning(message)


@dataclass(frozen=True)
class Expects:
    """What a fast forward reads from its component besides its arguments.

    ``params``: parameter name -> shape, written as configuration field names (a number for a
    fixed size); ``attrs``: submodules, hook points, buffers and methods; ``cfg``: configuration
    fields."""

    params: Mapping[str, tuple[str | int, ...]] = field(default_factory=dict)
    attrs: tuple[str, ...] = ()
    cfg: tuple[str, ...] = ()


@functools.cache
def _signature_mismatch(stock: Callable[..., object], fast: Callable[..., object]) -> str | None:
    want, got = inspect.signature(stock).parameters, inspect.signature(fast).parameters
    if list(want) == list(got):
        return None
    return f"forward takes ({', '.join(list(want)[1:])}), the fast one ({', '.join(list(got)[1:])})"


def mismatch(module: nn.Module, fast: type) -> str | None:
    """Why ``module`` (an instance of ``fast``'s stock base class) does not fit ``fast``'s
    forward (what ``fast._tlx_expects(cfg)`` lists), or None when it does."""
    base: type = fast._tlx_base  # type: ignore[attr-defined]
    reason = _signature_mismatch(base.forward, fast.forward)  # type: ignore[attr-defined]
    if reason is not None:
        return reason
    cfg = getattr(module, "cfg", None)
    if not isinstance(cfg, HookedTransformerConfig):
        return f"cfg is a {type(cfg).__name__}, not a HookedTransformerConfig"
    expects: Expects = fast._tlx_expects(cfg)  # type: ignore[attr-defined]
    missing = [f"cfg.{a}" for a in expects.cfg if not hasattr(cfg, a)]
    missing += [a for a in expects.attrs if not hasattr(module, a)]
    if missing:
        return "no " + ", ".join(missing)
    for name, dims in expects.params.items():
        param = module._parameters.get(name)
        want = tuple(d if isinstance(d, int) else getattr(cfg, d, None) for d in dims)
        if param is None or tuple(param.shape) != want:
            got = "missing" if param is None else f"shaped {tuple(param.shape)}"
            return f"parameter {name} {got}, expected {want}"
    return None
