"""CPU ops of our own in C++ (`csrc/`), compiled for this machine on first use and cached.

torch's cpp_extension builds them with the system's C++ compiler and ninja (a dependency; about 10 s once per
machine on 2 cores; later processes load the cached library in well under a second) into TORCH_EXTENSIONS_DIR
(default ~/.cache/torch_extensions), and registers them as `torch.ops.energon_hf.*`. They parallelize with
`at::parallel_for`, so they run on torch's own OpenMP threads: a second thread pool would make every parallel op
wait for its workers to wake (see loading.on_passing_thread).

Where no compiler is found, or `ENERGON_HF_CPU_EXTENSION=0` is set, `available()` is False (with one warning in
the first case) and callers keep their torch-only implementations, which are also the references in the tests.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import threading
from functools import cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).resolve().parent / "csrc" / name
           for name in ("paged_decode.cpp", "dequantize.cpp", "gemv.cpp", "elementwise.cpp", "varlen_attention.cpp",
                        "panel_gemm.cpp")]
OPS = ("paged_decode", "dequantize_int4_into", "dequantize_int8_into", "int4_gemv", "int8_gemv", "float_gemv",
       "gemv_vectorized", "rms_norm", "add_rms_norm", "silu_and_mul", "rotary", "varlen_attention", "add_layer_norm",
       "kv_cache_write", "panel_linear", "panel_linear_out")
# -march=native: the library is built on, and for, the machine that runs it. -fopenmp compiles at::parallel_for's
# parallel region; at run time it binds to the OpenMP library torch has already loaded (same soname).
# -fno-math-errno: sqrt as a plain instruction (glibc's vector expf is never called: see csrc/elementwise.cpp).
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno"]
_lock = threading.Lock()
# The dtypes the elementwise, attention and GEMV ops take (the GEMVs' weights are their own formats): half precision is
# widened to float32 (csrc/half.h; the GEMVs widen their few rows of x before the product) and computed there.
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def enabled() -> bool:
    """False when ENERGON_HF_CPU_EXTENSION is 0/false/off: the torch-only implementations run."""
    return os.environ.get("ENERGON_HF_CPU_EXTENSION", "1").strip().lower() not in ("0", "false", "off", "no")


def available() -> bool:
    """Whether the compiled ops are loaded in this process (building them first if needed)."""
    return enabled() and _load()


@cache
def cpu_flags() -> frozenset[str]:
    """This CPU's instruction-set flags (x86 /proc/cpuinfo; empty elsewhere): what the -march=native build has."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return frozenset(line.partition(":")[2].split())


def _build_tag() -> str:
    """A short hash of the CPU (its model and instruction sets: the build is -march=native, so a cache directory
    that travels to another kind of CPU must not hand it a library with instructions it lacks) and of the torch
    it links against."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    keys = ("model name", "flags", "Features", "CPU implementer", "CPU part")  # x86, then ARM's names
    seen = {line.split(":")[0].strip(): line for line in lines if line.startswith(keys)}
    facts = [platform.machine(), torch.__version__, *sorted(seen.values())]
    return hashlib.sha1("\n".join(facts).encode()).hexdigest()[:10]


@cache
def _load() -> bool:
    name = f"energon_hf_cpu_{_build_tag()}"
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    build_dir = root / name
    try:
        import fcntl  # POSIX: elsewhere the ImportError below keeps the torch-only paths

        from torch.utils import cpp_extension

        build_dir.mkdir(parents=True, exist_ok=True)
        with _lock, open(build_dir / "build.flock", "w") as held:
            # One builder at a time, process by process. The kernel drops this lock when its holder dies, unlike
            # cpp_extension's own lock file, which a build killed midway leaves behind for every later process to
            # wait on forever: while we hold ours, any such file is stale.
            fcntl.flock(held, fcntl.LOCK_EX)
            (build_dir / "lock").unlink(missing_ok=True)
            cpp_extension.load(name=name, sources=[str(s) for s in SOURCES], extra_cflags=CFLAGS,
                               extra_ldflags=["-fopenmp"], build_directory=str(build_dir), is_python_module=False)
    except Exception as exc:  # no compiler, a failed build: the torch-only paths still work
        log.warning("energon_hf: the compiled CPU ops are unavailable (%s: %s); using the torch-only paths",
                    type(exc).__name__, _first_error(str(exc)))
        return False
    return all(hasattr(torch.ops.energon_hf, op) for op in OPS)


def _first_error(message: str) -> str:
    """The compiler's first error line, else the message's last line (a failed build ends in ninja's summary)."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower() and "ninja" not in line.lower()]
    return (errors or lines or [""])[0 if errors else -1]
