"""Linux process-memory readings shared by recipes/peak_memory.py and benchmarks/bench_trainer.py: the RSS and its
high-water mark from ``/proc/self/status``, resetting that mark (``/proc/self/clear_refs``), and giving freed heap
pages back to the system (glibc's ``malloc_trim``) so that a baseline is what is really in use."""

from __future__ import annotations

import ctypes

__all__ = ["reset_rss_peak", "status_kib", "trim_heap"]


def status_kib(field: str) -> int:
    """A ``/proc/self/status`` field in KiB (``VmRSS``: resident now, ``VmHWM``: its high-water mark)."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_rss_peak() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM, ru_maxrss) to the current RSS (proc(5): ``5`` into
    ``clear_refs``, Linux >= 4.0); False where that is refused."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def trim_heap() -> None:
    """Give freed heap pages back to the system (glibc); elsewhere nothing to trim, a baseline is only less tight."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
