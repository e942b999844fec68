"""Memory: measure a call's peak, fit memory vs batch size and sequence length, pick a batch size
that fits a budget, and halve the batch when a device runs out of memory anyway.

The model of extra memory (beyond the weights) for ``b`` rows of ``n`` tokens is
``c0 + c1*b + c2*b*n``: next-token logits grow with the rows, the KV cache and cached hook outputs
with every token of every row. (Attention scores grow with the square of the length, but at the
lengths of trait prompts they are a few percent of the rest; a quadratic term fitted to small probes
extrapolated far worse than leaving it out.) Its coefficients are fitted to peaks measured
on the real work (generation and the teacher-forced pass) at a few small shapes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from tlextract.errors import TLExtractError
from tlextract.model.accel import available_ram, release_free_memory

log = logging.getLogger(__name__)
T = TypeVar("T")
GiB = 1024**3


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith(field + ":"))
    return int(line.split()[1])


class PeakMemory:
    """``with PeakMemory(device) as m: ...`` then ``m.peak`` is the most memory the block
    held at once beyond what was held before it, in bytes.

    CUDA uses the allocator's exact peak. On a CPU (Linux) the kernel's resident-set high-water
    mark is reset on entry (``/proc/self/clear_refs``) and read on exit, after malloc has handed
    cached memory back; nothing runs during the block (a sampling thread would steal the GIL
    from every small op and slow the measured code several-fold)."""

    def __init__(self, device: torch.device | str | None = "cpu"):
        self.device = torch.device(device or "cpu")
        self.peak = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        release_free_memory()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
        except OSError as e:
            raise TLExtractError(
                f"cannot measure peak memory here: /proc/self/clear_refs is not writable ({e})"
            ) from e
        self._base = _status_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
            return
        self.peak = max(0, _status_kib("VmHWM") * 1024 - self._base)


@dataclass(frozen=True)
class MemoryModel:
    """Extra bytes for ``batch`` rows of ``length`` tokens: c0 + c1*b + c2*b*n."""

    c0: float
    c1: float
    c2: float

    def predict(self, batch: int, length: int) -> float:
        return self.c0 + self.c1 * batch + self.c2 * batch * length

    def largest_batch(self, length: int, budget: float, limit: int) -> int:
        """The largest batch in [1, limit] predicted, with a 30% margin, to fit ``budget`` bytes
        (at least 1). The margin covers measurement drift: CPU peaks are read from RSS, which
        reuse of already resident heap pages can understate (17% seen in a long test process)."""
        fits = [b for b in range(1, limit + 1) if 1.3 * self.predict(b, length) <= budget]
        return max(fits, default=1)


def fit_memory_model(points: Sequence[tuple[int, int, float]]) -> MemoryModel:
    """Least squares over measured ``(batch, length, peak bytes)``, coefficients kept >= 0."""
    if len(points) < 3:
        raise ValueError("fit_memory_model needs at least 3 measurements")
    x = torch.tensor([[1.0, b, b * n] for b, n, _ in points], dtype=torch.float64)
    y = torch.tensor([p for _, _, p in points], dtype=torch.float64)
    coef = torch.linalg.lstsq(x, y).solution
    if (coef < 0).any():  # a negative term would predict less memory for bigger work
        keep = coef >= 0
        coef = torch.zeros_like(coef)
        coef[keep] = torch.linalg.lstsq(x[:, keep], y).solution.clamp(min=0)
    return MemoryModel(*(float(c) for c in coef))


def default_budget(device: torch.device | str | None) -> int:
    """Half the memory available now on CPU (the OS and other programs need the rest); 80% of
    the free memory on a GPU (:func:`cuda_free`)."""
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        return int(0.8 * cuda_free(device))
    return available_ram() // 2


def cuda_free(device: torch.device) -> int:
    """Bytes this process can still allocate on a CUDA device: what the driver has free plus
    what PyTorch's caching allocator holds reserved but unused (freed tensors it keeps for
    reuse; the driver counts them as taken)."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, torch.OutOfMemoryError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and (
        "can't allocate memory" in text or "out of memory" in text.lower()
    )


class HalvingBatches:
    """Run work in chunks of at most ``size`` items; on out-of-memory, halve ``size`` and retry
    the chunk. The smaller size sticks for later calls, so each size fails at most once."""

    def __init__(self, size: int, device: torch.device | str | None = "cpu"):
        self.size = size
        self.device = torch.device(device or "cpu")

    def run(self, items: Sequence[T], work: Callable[[list[T]], list]) -> list:
        out: list = []
        start = 0
        while start < len(items):
            chunk = list(items[start : start + self.size])
            try:
                out.extend(work(chunk))
                start += len(chunk)
                continue
            except RuntimeError as e:  # torch.OutOfMemoryError is one
                if not is_out_of_memory(e):
                    raise
                if len(chunk) == 1:
                    raise TLExtractError(
                        f"out of memory on {self.device} with a single example; use a smaller "
                        'model, dtype="bfloat16" on a GPU, or fewer generation.max_new_tokens.',
                        parameters=("dtype",),
                    ) from e
            # Out of the except block: the error and its traceback, whose frames hold the failed
            # batch's tensors, are gone, so the cache can hand their memory back.
            self.size = len(chunk) // 2
            log.warning("out of memory at batch size %d; retrying at %d", len(chunk), self.size)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        return out
