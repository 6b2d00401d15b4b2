"""What this machine lends a run: usable cores and free memory (no torch, numba or h5py here)."""
from __future__ import annotations

import os


def cpu_threads() -> int:
    """Cores this process may use (its CPU affinity, not the machine's total).

    The one default for decoding threads (pack, infer, eda), the synthetic
    painter and torch's intra-op threads.
    """
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def available_ram() -> int:
    """Bytes of memory the OS can still give us (``MemAvailable``), or 0 if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
