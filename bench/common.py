"""Shared by the benchmark scripts: timing side by side, and what machine ran it."""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import transformers

import energon_hf


def time_calls(calls: dict[str, Callable[[], Any]], warmup: int, repeats: int) -> dict[str, list[float]]:
    """Warm every call up, then time them interleaved (alternating the order each repeat) so slow
    drifts of the machine (frequency, a noisy neighbour) hit both sides alike."""
    for _ in range(warmup):
        for call in calls.values():
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for rep in range(repeats):
        for name in names if rep % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - start)
    return times


def machine_info(threads: int) -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "energon_hf": energon_hf.__version__,
        "mkldnn": torch.backends.mkldnn.is_available(),
        # Other processes compete for the cores; with --threads = all cores, every OpenMP barrier
        # waits for a descheduled thread and op-heavy code (the packed per-sequence loop) suffers most.
        "loadavg_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
