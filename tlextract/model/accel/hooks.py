"""Hook-point tests the fast forward passes make (a hook point with no hook is skipped, the test
``nn.Module.__call__`` makes before it calls the identity ``forward``)."""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn.modules import module as _torch_module
from transformer_lens.hook_points import HookPoint
from transformer_lens.model_bridge import TransformerBridge

from tlextract.model.accel.fused import no_type_check

# torch's private global hook dicts (``register_module_forward_hook`` & co. fill them). A torch
# without one of them gets a dict that is never empty: every module then counts as hooked, so
# every hook point is called and nothing is shared between rows (slower, never wrong).
_ALWAYS = {0: None}
_GF, _GFP, _GB, _GBP = (
    d if isinstance(d := getattr(_torch_module, name, None), dict) else _ALWAYS
    for name in (
        "_global_forward_hooks",
        "_global_forward_pre_hooks",
        "_global_backward_hooks",
        "_global_backward_pre_hooks",
    )
)


@no_type_check
def is_hooked(m: nn.Module, pre_hooks: bool = True) -> bool:
    """Whether calling ``m`` would run any hook: the test ``nn.Module._call_impl`` makes."""
    return bool(
        m._forward_hooks
        or (pre_hooks and m._forward_pre_hooks)
        or m._backward_hooks
        or m._backward_pre_hooks
        or _GF
        or _GFP
        or _GB
        or _GBP
    )


@no_type_check
def run_hook(hook: HookPoint, x: Tensor) -> Tensor:
    """``hook(x)``; a HookPoint's forward is the identity, so without hooks it is just ``x``."""
    return hook(x) if is_hooked(hook) else x


@no_type_check
def has_hooks(m: nn.Module) -> bool:
    """Whether any hook is attached to ``m`` or a module inside it, apart from the forward
    pre-hook :func:`accelerate` puts on the model (it only resets per-pass memos). On a
    TransformerBridge, only its hook points count: from its first pass on, it keeps pre-hooks of
    its own on the wrapped model's norms (BlockBridge's capture wiring)."""
    if isinstance(m, TransformerBridge):
        return any(is_hooked(sub) for sub in m.modules() if isinstance(sub, HookPoint))
    memo = m.__dict__.get("_tlx_memo")
    only_ours = memo is not None and all(h == memo.reset for h in m._forward_pre_hooks.values())
    return is_hooked(m, pre_hooks=not only_ours) or any(
        is_hooked(sub) for sub in m.modules() if sub is not m
    )


def keep_name(cls: type) -> type:
    """Mark an accelerated subclass (single inheritance, so ``__class__`` can be swapped) and keep
    TransformerLens' class name in the module repr."""
    base = cls.__bases__[0]
    cls._tlx_base = base  # type: ignore[attr-defined]
    cls._get_name = lambda self: base.__name__  # type: ignore[attr-defined]
    return cls
