"""TransformerLens parameters stored in the layout matrix products want, as views of one buffer.

TransformerLens keeps ``W_Q`` as ``[head, d_model, d_head]``, ``W_in`` as ``[d_model, d_mlp]``,
``W_U`` as ``[d_model, vocab]``: good for reading, bad for products (a decode step would run one
small batched product per head, and BLAS is fastest with the weight as ``[out, in]``, rows
contiguous). :class:`FusedLinear` moves the values of a group of parameters (Q, K and V; gate and
up; one weight alone) into a single ``[out, in]`` buffer and points each parameter at its view of
that buffer (``param.data = view``: same ``Parameter`` object, same shape and values, other
strides). Then:

* one product computes Q, K and V together (or gate and up), with no copy of any weight;
* edits of the parameters (in place, through ``.data``, by ``load_state_dict``) are edits of the
  buffer, so the product always sees the current weights;
* a parameter given new storage (``p.data = t``, ``model.to(...)``, a new ``Parameter``) no
  longer views the buffer; :meth:`FusedLinear.weight` notices (a pointer and stride test per
  parameter, per forward pass) and rebuilds the buffer from the parameters' current values.

On CPU in float32 with no gradient to record, products run through oneDNN
(``torch.ops.mkldnn._linear_pointwise``, the kernel ``torch.compile`` uses for CPU linears); on
this project's 2-core AMD machine it is 2-4x faster than ``F.linear`` (MKL) for the decode
shapes (docs/benchmarks). Anything else (autograd, CUDA, half precision, a torch build without
oneDNN) uses ``F.linear``.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tlextract.model.accel.process import available_ram

log = logging.getLogger(__name__)

_T = TypeVar("_T")


def no_type_check(obj: _T) -> _T:
    """Keep the jaxtyping import hook (pytest's ``--jaxtyping-packages=tlextract``) off this code.

    The hook wraps every function of the package in a runtime type checker, about 20 us per call;
    the forward passes below make ~40 small calls per layer (mostly hook-point tests that are
    otherwise ~100 ns), so under pytest the wrappers would cost more than the work they check.
    The hook skips anything decorated with a name ``no_type_check`` (as it does
    ``typing.no_type_check``); this one changes nothing at runtime and, unlike
    ``typing.no_type_check``, keeps mypy checking these functions. Nothing here has jaxtyping
    shape annotations to check."""
    return obj


# How a parameter's shape maps to rows of an [out, in] weight:
#   "in_out":    [in, out]          (W_in, W_gate, W_out, W_U): rows are the columns
#   "heads_in":  [head, in, d_head] (W_Q, W_K, W_V): rows are (head, d_head)
#   "heads_out": [head, d_head, out] (W_O): the input is (head, d_head)
#   "bias":      any shape, flattened (b_Q [head, d_head], b_U [vocab], ...)
Kind = Literal["in_out", "heads_in", "heads_out", "bias"]


def _n_rows(kind: Kind, shape: torch.Size) -> int:
    if kind == "heads_in":
        return shape[0] * shape[2]
    if kind == "bias":
        return shape.numel()
    return shape[-1]


def _n_in(kind: Kind, shape: torch.Size) -> int:
    if kind == "heads_out":
        return shape[0] * shape[1]
    return shape[-2] if kind == "in_out" else shape[1]


def _as_param(kind: Kind, rows: Tensor, shape: torch.Size) -> Tensor:
    """The view of ``rows`` (``[out, in]``, or ``[out]`` for a bias) shaped like the parameter."""
    if kind == "in_out":
        return rows.T
    if kind == "heads_in":
        return rows.view(shape[0], shape[2], shape[1]).transpose(1, 2)
    if kind == "heads_out":
        return rows.T.view(shape)
    return rows.view(shape)


@functools.cache
def _onednn_available() -> bool:
    """Whether oneDNN's linear runs and agrees with ``F.linear`` (checked on first use)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        x, w = torch.ones(2, 3), torch.ones(4, 3)
        out = torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
    except (RuntimeError, AttributeError):
        return False
    return bool(torch.equal(out, F.linear(x, w)))


# Rows the blocked layout is prepared for; measured as good from 1 to 848 rows (docs/benchmarks).
_PACK_ROWS = 16


@no_type_check
def _onednn_fits(x: Tensor, weight: Tensor) -> bool:
    return (
        x.dtype == torch.float32
        and x.device.type == "cpu"
        and weight.dtype == torch.float32
        and weight.device.type == "cpu"
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and _onednn_available()
    )


@no_type_check
def linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear``, through oneDNN where that is faster and exact in float32 (see module doc)."""
    if _onednn_fits(x, weight):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


@dataclass(frozen=True)
class _Slot:
    name: str
    kind: Kind
    start: int  # first row in the buffer
    stop: int


@no_type_check
class FusedLinear:
    """A group of ``module``'s parameters stacked as one ``[out, in]`` weight (and ``[out]`` bias).

    ``weights``: (parameter name, kind) in output order; ``biases``: the matching bias names,
    or None for a product without bias. All weights must have the same input size."""

    def __init__(
        self,
        module: nn.Module,
        weights: Sequence[tuple[str, Kind]],
        biases: Sequence[str] | None = None,
    ) -> None:
        self.module = module
        self.slots: list[_Slot] = []
        start = 0
        for name, kind in weights:
            n = _n_rows(kind, getattr(module, name).shape)
            self.slots.append(_Slot(name, kind, start, start + n))
            start += n
        self.bias_slots = (
            [_Slot(b, "bias", s.start, s.stop) for b, s in zip(biases, self.slots, strict=True)]
            if biases is not None
            else []
        )
        self._weight: Tensor = torch.empty(0)
        self._bias: Tensor | None = None
        self._expected: list[tuple[str, int, tuple[int, ...]]] = []
        # oneDNN's blocked copy of the weight, used only inside packed_weights(); kept between
        # sessions with the fingerprint of the values it was made from.
        self.packed: Tensor | None = None
        self._pack: tuple[Tensor, Tensor, Tensor] | None = None  # (packed, weight, fingerprint)
        self._build()

    def __call__(self, x: Tensor) -> Tensor:
        """``x @ weight.T + bias``: the packed weight inside a session, else the plain one."""
        weight, bias = self.weight()
        if self.packed is not None and _onednn_fits(x, weight):
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, bias, "none", [], "")
        return linear(x, weight, bias)

    def rows(self, i: int) -> slice:
        """Rows of the ``i``-th weight in the buffer (and in the product's output)."""
        return slice(self.slots[i].start, self.slots[i].stop)

    def weight(self) -> tuple[Tensor, Tensor | None]:
        """The fused weight and bias, rebuilt first if a parameter stopped viewing them."""
        params = self.module._parameters
        for name, ptr, stride in self._expected:
            p = params[name]
            if p is None or p.data_ptr() != ptr or p.stride() != stride:
                self._build()
                self.packed = self._pack = None
                break
        return self._weight, self._bias

    @torch.no_grad()
    def _build(self) -> None:
        """Copy the parameters' current values into fresh buffers and point them there."""
        first = getattr(self.module, self.slots[0].name)
        kind0 = self.slots[0].kind
        n_in = _n_in(kind0, first.shape)
        n_out = self.slots[-1].stop
        with torch.inference_mode(False):  # parameters must stay usable outside inference mode
            weight = torch.empty(n_out, n_in, dtype=first.dtype, device=first.device)
            bias = (
                torch.empty(n_out, dtype=first.dtype, device=first.device)
                if self.bias_slots
                else None
            )
            expected = []
            for slot in self.slots:
                expected.append(self._adopt(slot, weight))
            for slot in self.bias_slots:
                assert bias is not None
                expected.append(self._adopt(slot, bias))
        self._weight, self._bias, self._expected = weight, bias, expected

    def _adopt(self, slot: _Slot, buffer: Tensor) -> tuple[str, int, tuple[int, ...]]:
        param = self.module._parameters[slot.name]
        if param is None:
            raise ValueError(f"{type(self.module).__name__}.{slot.name} is None")
        view = _as_param(slot.kind, buffer[slot.start : slot.stop], param.shape)
        view.copy_(param.detach())
        param.data = view
        return slot.name, view.data_ptr(), tuple(view.stride())

    @torch.no_grad()
    def release(self) -> None:
        """Give each parameter that still views the buffer storage of its own (contiguous, as
        TransformerLens makes it, same values); the buffer and packed copy are dropped."""
        params = self.module._parameters
        with torch.inference_mode(False):
            for name, ptr, stride in self._expected:
                p = params[name]
                if p is not None and p.data_ptr() == ptr and p.stride() == stride:
                    p.data = torch.empty_like(p, memory_format=torch.contiguous_format).copy_(p)
        self._weight, self._bias, self._expected = torch.empty(0), None, []
        self.packed = self._pack = None

    @torch.no_grad()
    def pack(self) -> bool:
        """Make ``packed`` current for a session; False where oneDNN does not apply.

        The values are checked, not only the storage: an edit through ``.data`` bumps no version
        counter, so a fingerprint (the weight times a fixed random vector, one read of the
        weight, ~1/30 of the repacking cost) is compared with the one taken when packing. An
        edit that moves no row's fingerprint is one below float32 rounding of that product."""
        weight, _ = self.weight()
        if not _onednn_fits(weight[:1], weight) or torch.is_grad_enabled():
            return False
        probe = torch.randn(
            weight.shape[1], generator=torch.Generator().manual_seed(0), dtype=weight.dtype
        )
        fingerprint = linear(probe[None], weight, None)
        if (
            self._pack is None
            or self._pack[1] is not weight
            or not torch.equal(self._pack[2], fingerprint)
        ):
            packed = torch.ops.mkldnn._reorder_linear_weight(weight, _PACK_ROWS)
            self._pack = (packed, weight, fingerprint)
        self.packed = self._pack[0]
        return True


@contextmanager
def packed_weights(layers: Sequence[FusedLinear]) -> Iterator[None]:
    """Within: products of ``layers`` use oneDNN's blocked copy of each weight (1.4x faster than
    the plain weight at 16 rows, 2.6x at 64; ~0.5 s to pack SmolLM2 the first time, ~15 ms to
    check the copies are current on later entries). Weights must not change inside. The copies
    double the weights' memory, so nothing new is packed when that would take more than a
    quarter of the RAM available (the plain weights are used instead). Only weights oneDNN
    packs count: host-resident float32 ones (a GPU's weights are no host RAM)."""
    todo = [f for f in layers if f.packed is None]
    new_bytes = sum(
        f._weight.nbytes for f in todo if f._pack is None and _onednn_fits(f._weight[:1], f._weight)
    )
    if new_bytes and new_bytes > available_ram() // 4:
        log.info(
            "packed weights skipped: %.1f GiB would be over a quarter of free RAM",
            new_bytes / 2**30,
        )
        todo = [f for f in todo if f._pack is not None]
    entered = [f for f in todo if f.pack()]
    try:
        yield
    finally:
        for f in entered:
            f.packed = None
