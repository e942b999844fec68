"""The decode-step floor a contender is measured against: every weight of the matrix products
read once at the memory bandwidth, and ``2 * weights * rows`` FLOPs at the matrix-product
throughput, both measured on this machine (a large sum, a large product)."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformer_lens import HookedTransformer

from tlextract.model.accel import linear

# The matrix-product weights of a block (TransformerLens names; _W_K/_W_V for grouped queries).
_PRODUCT_WEIGHT = re.compile(
    r"blocks\.\d+\.(attn\.(W_Q|_?W_K|_?W_V|W_O)|mlp\.(W_in|W_gate|W_out))$"
)


@dataclass(frozen=True)
class Roofline:
    bandwidth: float  # bytes/s read from a large tensor
    flops: float  # FLOP/s of a large matrix product, the faster of F.linear and oneDNN

    def decode_step(self, weights: int, itemsize: int, rows: int) -> float:
        """Seconds one decode step of ``rows`` rows cannot beat (see the module docstring)."""
        return max(weights * itemsize / self.bandwidth, 2 * weights * rows / self.flops)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_seconds(fn: Callable[[], object], device: torch.device, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


@torch.inference_mode()
def measure_roofline(device: str | torch.device, dtype: torch.dtype) -> Roofline:
    device = torch.device(device)
    gpu = device.type == "cuda"
    src = torch.ones((2**28 if gpu else 2**26), dtype=torch.float32, device=device)
    read_s = _best_seconds(lambda: src.sum(), device, 5)  # reading, as weights are read
    n = 8192 if gpu else 2048
    a = torch.randn(n, n, device=device).to(dtype)
    w = torch.randn(n, n, device=device).to(dtype)
    product_s = min(
        _best_seconds(lambda: torch.nn.functional.linear(a, w), device, 5),
        _best_seconds(lambda: linear(a, w, None), device, 5),
    )
    return Roofline(bandwidth=src.nbytes / read_s, flops=2 * n**3 / product_s)


def product_weights(model: HookedTransformer) -> int:
    """Elements of every weight a token is multiplied by (blocks and unembedding)."""
    return sum(
        p.numel()
        for name, p in model.named_parameters()
        if _PRODUCT_WEIGHT.match(name) or name == "unembed.W_U"
    )
