"""The accelerator, behind one door: everything in tlextract that swaps TransformerLens classes,
makes parameters views of fused storage, calls private torch ops (oneDNN's linear, torch's global
hook dicts) or libc (malloc settings) lives in this subpackage, and only the names below leave it.

* :func:`accelerate` / :func:`restore`: in place, on a ``HookedTransformer``; restore gives back
  stock classes, parameters with storage of their own and the same values, no ``_tlx_``
  attribute: a model equal to a freshly loaded stock one. :func:`is_accelerated` tells which.
* :func:`decode_session`: oneDNN's packed weights for the many passes of a generation.
* :func:`has_hooks`: whether anything is hooked on a model (not counting accelerate's own
  pre-hook); :func:`linear`: ``F.linear`` through oneDNN where that is faster (benchmarks).
* :func:`keep_freed_memory`, :func:`release_free_memory`, :func:`available_ram`: the process's
  memory (process.py); only ``load_model`` applies the malloc setting, never ``accelerate``.

On an untested TransformerLens or torch release a self-check at load (accelerated vs stock on a
tiny model of the same architecture, dtype and device; selfcheck.py) decides: accelerated when it
agrees, else one warning naming the versions and what differed, and the model stays stock. A
component other than the fast forward expects stays stock with one warning (guard.py); components
left stock by design (parallel blocks) are not warned about. Slower, never other numbers.
"""

from tlextract.model.accel.fused import linear
from tlextract.model.accel.guard import TESTED
from tlextract.model.accel.hooks import has_hooks
from tlextract.model.accel.process import (
    KEEP_FREED_MEMORY_ENV,
    available_ram,
    keep_freed_memory,
    release_free_memory,
)
from tlextract.model.accel.swap import accelerate, decode_session, is_accelerated, restore

__all__ = [
    "KEEP_FREED_MEMORY_ENV",
    "TESTED",
    "accelerate",
    "available_ram",
    "decode_session",
    "has_hooks",
    "is_accelerated",
    "keep_freed_memory",
    "linear",
    "release_free_memory",
    "restore",
]
