"""CPU ops of our own in C++ (`csrc/`), compiled for this machine on first use and cached.

torch's cpp_extension builds them with the system's C++ compiler (about 10 s once per machine on 2 cores; later
processes load the cached library in well under a second) into TORCH_EXTENSIONS_DIR (default
~/.cache/torch_extensions), and registers them as `torch.ops.energon_hf.*`. They parallelize with
`at::parallel_for`, so they run on torch's own OpenMP threads: a second thread pool would make every parallel op
wait for its workers to wake (see loading.on_passing_thread).

Where no compiler is found, or `ENERGON_HF_CPU_EXTENSION=0` is set, `available()` is False (with one warning in
the first case) and callers keep their torch-only implementations, which are also the references in the tests.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from functools import cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).resolve().parent / "csrc" / name for name in ("paged_decode.cpp", "dequantize.cpp")]
OPS = ("paged_decode", "dequantize_int4_into")
# -march=native: the library is built on, and for, the machine that runs it. -fopenmp compiles at::parallel_for's
# parallel region; at run time it binds to the OpenMP library torch has already loaded (same soname).
# -fno-math-errno lets `#pragma omp simd` loops call glibc's vector expf.
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno"]
_lock = threading.Lock()


def enabled() -> bool:
    """False when ENERGON_HF_CPU_EXTENSION is 0/false/off: the torch-only implementations run."""
    return os.environ.get("ENERGON_HF_CPU_EXTENSION", "1").strip().lower() not in ("0", "false", "off", "no")


def available() -> bool:
    """Whether the compiled ops are loaded in this process (building them first if needed)."""
    return enabled() and _load()


def _cpu_tag() -> str:
    """A short hash of the CPU's model and instruction sets: the build is -march=native, so a cache directory that
    travels to another kind of CPU must not hand it a library with instructions it lacks."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    wanted = [line for line in lines if line.startswith(("model name", "flags"))][:2]
    return hashlib.sha1("\n".join(wanted).encode()).hexdigest()[:10]


@cache
def _load() -> bool:
    with _lock:  # one build per process; cpp_extension's own lock file serializes processes
        try:
            from torch.utils import cpp_extension

            cpp_extension.load(name=f"energon_hf_cpu_{_cpu_tag()}", sources=[str(s) for s in SOURCES],
                               extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"], is_python_module=False)
        except Exception as exc:  # no compiler, no ninja, a failed build: the torch-only paths still work
            log.warning("energon_hf: the compiled CPU ops are unavailable (%s: %s); using the torch-only paths",
                        type(exc).__name__, str(exc).strip().splitlines()[-1] if str(exc).strip() else "")
            return False
    return all(hasattr(torch.ops.energon_hf, op) for op in OPS)
