"""Peak resident memory of this process, for the memory benchmarks (Linux only)."""

from __future__ import annotations


def peak_gb() -> float:
    """The resident set's high-water mark (``VmHWM``) in GB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 2 ** 20


def reset_peak() -> float:
    """Reset the high-water mark to the current resident set (``/proc/self/clear_refs``) and return it:
    the "base" a pass's peak is measured from."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return peak_gb()
