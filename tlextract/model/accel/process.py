"""What the accelerator asks of the whole process: glibc's malloc settings, handing cached memory
back to the OS, and how much RAM is free. The only place tlextract calls libc.

Nothing here runs on import. :func:`keep_freed_memory` changes malloc for the whole process and
cannot be undone; :func:`tlextract.load_model` calls it for a fast model on CPU unless
``TLEXTRACT_KEEP_FREED_MEMORY=0`` (``tx.accelerate`` never does)."""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

# Set to 0 to keep glibc's own malloc settings (load_model then leaves the process alone).
KEEP_FREED_MEMORY_ENV = "TLEXTRACT_KEEP_FREED_MEMORY"

# mallopt parameters (glibc malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_applied = False


def keep_freed_memory() -> bool:
    """Let glibc keep freed activations for reuse instead of handing them back to the OS.

    By default blocks of a few MB are mmap-ed and unmapped again, so every such activation
    of a CPU forward pass is page-faulted in anew: a quarter of a batch-16 teacher-forced pass
    here. Blocks up to 32 MB now come from the heap and up to 1 GB of free heap is kept
    (process-wide, for the rest of the process; PeakMemory trims before it measures). Returns
    whether it applied (False off glibc)."""
    global _applied
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 32 * 2**20)
        libc.mallopt(_M_TRIM_THRESHOLD, 2**30)
    except (OSError, AttributeError):
        return False
    if not _applied:
        log.info(
            "glibc malloc now keeps freed memory for reuse (whole process; %s=0 before "
            "load_model keeps the defaults)",
            KEEP_FREED_MEMORY_ENV,
        )
    _applied = True
    return True


def release_free_memory() -> None:
    """Hand memory that malloc keeps cached back to the OS, so new allocations show in RSS."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def available_ram() -> int:
    """Bytes of RAM available to new allocations now (Linux ``MemAvailable``)."""
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) * 1024
