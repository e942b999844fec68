"""Every tensor on the model's device: generate with capture, the activations pass, steering,
monitoring and a plain unmasked forward of the accelerated model, on the ``meta`` device.

This machine has no GPU; a model on ``meta`` has shapes and devices but no data, so an op that
mixes a CPU tensor into the model's work fails or is caught here as it would fail on CUDA
(stock TransformerLens runs there). A TorchDispatchMode checks every op:
* no op mixes devices, apart from explicit moves (``to``, ``_to_copy``, ``copy_``) and CPU scalars
  (0-dim CPU tensors, which torch accepts beside any device);
* inside the model's forward pass, every op runs on the model's device.
Host reads of a meta tensor cannot return data, so the mode answers them with stubs: ``item``
and ``_local_scalar_dense`` give 0 (False for bool), ``is_nonzero`` False, ``equal`` True (the
rotary tables compared across layers are equal), a copy to the host (``cpu()``, ``tolist()``)
gives zeros of the tensor's shape and dtype, and a random generator on ``meta`` is a CPU one. So
every sampled token is 0 and no row ever stops: the test is about devices, not values (those
are tested on the CPU elsewhere).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from conftest import MIXED_LENGTH_TEXTS, chat_ids
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from tlextract.config import GenerationSettings
from tlextract.model.load import load_model
from tlextract.ops.generate import generate_batch
from tlextract.ops.monitor import monitor
from tlextract.ops.pool import hook_name, pooled_activations
from tlextract.ops.steer import ablate, steer
from tlextract.ops.trait_vectors import TraitVectors

aten = torch.ops.aten
MOVES = {aten._to_copy.default, aten.to.dtype_layout, aten.copy_.default}
TO_HOST = {aten._to_copy.default, aten.to.dtype_layout}
META = torch.device("meta")


def _stub_read(func: Any, tensors: list[Tensor]) -> Any:
    """What a host read of a meta tensor answers (see the module docstring)."""
    if func in (aten._local_scalar_dense.default, aten.item.default):
        return False if tensors[0].dtype == torch.bool else 0
    if func is aten.is_nonzero.default:
        return False
    if func is aten.equal.default:
        return True
    return NotImplemented


class OnDevice(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.in_forward = 0
        self.faults: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)]
        if any(t.is_meta for t in tensors):
            stub = _stub_read(func, tensors)
            if stub is not NotImplemented:
                return stub
            if func in TO_HOST and kwargs.get("device") == torch.device("cpu"):
                dtype = kwargs.get("dtype") or tensors[0].dtype
                return torch.zeros(tensors[0].shape, dtype=dtype)  # a copy to the host
            if func is aten.copy_.default and not args[0].is_meta:
                return args[0].zero_()  # a copy into a host tensor
        devices = {t.device for t in tensors if not (t.device.type == "cpu" and t.ndim == 0)}
        if func not in MOVES and len(devices) > 1:
            self.faults.append(f"{func} mixes {sorted(map(str, devices))}")
        out = func(*args, **kwargs)
        if self.in_forward and func not in MOVES:
            outs = [t for t in tree_leaves(out) if isinstance(t, Tensor)]
            if any(t.device != META for t in outs):
                self.faults.append(f"{func} runs on the CPU inside the forward pass")
        return out


@pytest.fixture(scope="module")
def meta_model():  # type: ignore[no-untyped-def]
    model = load_model("tiny-random")  # accelerated
    model.to("meta")
    assert str(model.cfg.device) == "meta"
    assert all(p.is_meta for p in model.parameters())
    return model


@contextmanager
def checked(model, monkeypatch) -> Iterator[OnDevice]:  # type: ignore[no-untyped-def]
    """The device check on every op; the model's forward marks where ops must be on ``meta``
    (an instance attribute, not a hook: a hook would turn prefix sharing off)."""
    mode = OnDevice()
    forward = model.forward

    def marked(*args: Any, **kwargs: Any) -> Any:
        mode.in_forward += 1
        try:
            return forward(*args, **kwargs)
        finally:
            mode.in_forward -= 1

    monkeypatch.setattr(model, "forward", marked)
    # meta has no random generator: rows get CPU ones (a stub, like the host reads)
    real = torch.Generator
    monkeypatch.setattr(torch, "Generator", lambda device=None: real())
    with mode:
        yield mode
    monkeypatch.undo()
    assert not mode.faults, sorted(set(mode.faults))


def _vectors(model) -> TraitVectors:  # type: ignore[no-untyped-def]
    layers = tuple(range(model.cfg.n_layers))
    v = torch.randn(len(layers), model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    return TraitVectors("t", "mean_diff", "tiny-random", "resid_post", layers, v)


def test_an_unmasked_forward_stays_on_the_device(meta_model, monkeypatch) -> None:
    """No attention mask reaches the attention (a tokenizer padding on the right, as
    TransformerLens sets it for a model ``tx.accelerate`` is given; or a pass started from a
    residual): the causal mask must be built on the queries' device."""
    tokens = torch.tensor([[5, 6, 7, 8]], device=META)
    monkeypatch.setattr(meta_model.tokenizer, "padding_side", "right")
    with checked(meta_model, monkeypatch), torch.inference_mode():
        meta_model(tokens)
        _, cache = meta_model.run_with_cache(tokens)
        meta_model(cache["blocks.0.hook_resid_post"], start_at_layer=1)


def test_generate_capture_pool_steer_monitor_stay_on_the_device(meta_model, monkeypatch) -> None:
    prompts = chat_ids(meta_model, MIXED_LENGTH_TEXTS)
    names = [hook_name("resid_post", layer) for layer in range(meta_model.cfg.n_layers)]
    sampled = GenerationSettings(max_new_tokens=4, do_sample=True, temperature=1.0)
    vectors = _vectors(meta_model)
    with checked(meta_model, monkeypatch):
        gens = generate_batch(meta_model, prompts, sampled, seeds=[0, 1, 2, 3], capture=names)
        assert all(g.pooled is not None for g in gens)
        greedy = GenerationSettings(max_new_tokens=3, do_sample=False)
        generate_batch(meta_model, prompts[:1], greedy, seeds=[0])
        pooled_activations(meta_model, prompts, [g.response_ids for g in gens], [0, 2])
        with steer(meta_model, vectors, 1, 2.0, scale=1.0):
            generate_batch(meta_model, prompts, greedy, seeds=[0, 1, 2, 3])
        with ablate(meta_model, vectors, 1, positions="response"):
            generate_batch(meta_model, prompts, greedy, seeds=[0, 1, 2, 3])
        monitor(meta_model, ["Hi", "Why?"], vectors, 1, settings=sampled)
