"""Shared by the benchmark scripts: timing side by side, what machine ran it, and where the result goes."""

from __future__ import annotations

import json
import os
import platform
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import torch
import transformers

import energon_hf


def write_result(path: Path, result: dict[str, Any]) -> Path:
    """A benchmark's result as JSON at `path` (its folder made if missing); values JSON lacks become strings."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return path


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
        "cpu_model": cpu_model(),  # sessions land on different hosts (AMD EPYC, Intel Xeon): ratios are per host
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


def cpu_model() -> str | None:
    """The CPU's model name and its AVX-512/AMX features, as Linux reports them."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    name = re.search(r"^model name\s*:\s*(.+)$", info, re.M)
    flags = re.search(r"^flags\s*:\s*(.+)$", info, re.M)
    wanted = ("avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "amx_bf16", "amx_int8")
    features = [f for f in wanted if flags and f in flags.group(1).split()]
    return f"{name.group(1).strip() if name else 'unknown'} ({' '.join(features) or 'no AVX-512'})"


def synchronized(call: Callable[[], Any], device: torch.device) -> Callable[[], Any]:
    """`call`, returning only once a CUDA device has finished it (so that wall-clock timing is honest)."""
    if device.type != "cuda":
        return call

    def run() -> Any:
        out = call()
        torch.cuda.synchronize(device)
        return out
    return run


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), without numpy."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(command: list[str], threads: int, log: Path, timeout_s: float = 300) -> tuple[subprocess.Popen, str]:
    """Start a server process (`command` + `--port` a free port) and wait until its /health answers 200."""
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           # The server (tp=1: the model runs in its own process) never calls torch.set_num_threads, so
           # torch takes its intra-op thread count from OpenMP's environment.
           "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    env.pop("ENERGON_HF_API_KEY", None)  # a key in our environment would make the server demand it
    # The log goes to a file, not a pipe nobody reads: a full pipe would block the server.
    with log.open("w") as out:
        process = subprocess.Popen([*command, "--port", str(port)], env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited ({process.returncode}): {log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    stop_server(process)
    raise RuntimeError(f"the server did not come up in {timeout_s:.0f} s: {log.read_text()[-3000:]}")


def stop_server(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def batch_size_stats(url: str) -> dict[str, tuple[float, float]]:
    """(sum, count) of the server's batch-size histogram per step kind (prefill, decode, encode): the
    difference across a run gives its mean batch, i.e. how well the clients kept it full. The server
    observes a decode step after retiring the sequences it finished, so decode slightly undercounts."""
    text = httpx.get(url + "/metrics", timeout=10).text
    stats: dict[str, list[float]] = {}
    for part, kind, value in re.findall(r'^energon_batch_size_(sum|count)\{kind="(\w+)"\} (\S+)$', text, re.M):
        stats.setdefault(kind, [0.0, 0.0])[0 if part == "sum" else 1] = float(value)
    return {kind: (total, count) for kind, (total, count) in stats.items()}


def first_token_histogram(url: str) -> dict[float, float]:
    """The server's time-to-first-token histogram: cumulative count per upper bound (inf: all requests)."""
    text = httpx.get(url + "/metrics", timeout=10).text
    return {float(le): float(value) for le, value in
            re.findall(r'^energon_time_to_first_token_seconds_bucket\{le="([^"]+)"\} (\S+)$', text, re.M)}


def histogram_quantile(q: float, before: dict[float, float], after: dict[float, float]) -> float | None:
    """The q-quantile of what a cumulative histogram saw between two scrapes, interpolated linearly inside its
    bucket (Prometheus' histogram_quantile); None if it saw nothing."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    if not counts or counts[-1] <= 0:
        return None
    rank, lower, below = q * counts[-1], 0.0, 0.0
    for bound, count in zip(bounds, counts, strict=True):
        if count >= rank:
            if bound == float("inf"):
                return lower
            return lower + (bound - lower) * (rank - below) / max(count - below, 1e-12)
        lower, below = bound, count
    return lower


def read_bandwidth(mib: int = 256, repeats: int = 7) -> float:
    """Bytes/s this process reads from memory on its torch threads: the best sum over a tensor far larger
    than the caches (the ceiling for a decode step, which streams every weight once)."""
    data = torch.ones(mib * 2**20 // 4)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - start)
    return data.numel() * 4 / best
