"""A worker rank: joins the tp x pp process group, builds its share of the model, then runs the driver's
steps until told to stop. Every step is answered (the result from the output rank, an acknowledgement from
the others, or the exception), so the driver always knows when a step is over on every rank.

Started by the driver as `python -P -m energon_hf.engine CONTROL_FD LIFELINE_FD` (a fresh
interpreter, like multiprocessing's spawn, but without re-running the caller's script unless a model
factory defined in it has to be found there).
"""

from __future__ import annotations

import io
import os
import pickle
import resource
import runpy
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import timedelta
from multiprocessing.connection import Connection
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from energon_hf.nn.formats import weight_bytes
from energon_hf.parallel import init_parallel, stage_layers, state

from .pipeline import PipelineStage, call_stage
from .runner import LocalRunner


def peak_rss_bytes() -> int:
    """This process's peak resident memory. Linux: VmHWM, which starts afresh at exec; getrusage's ru_maxrss
    would carry over the high-water mark of the process that spawned us (a driver holding a whole model)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB


@dataclass(frozen=True)
class WorkerSpec:
    rank: int
    tp: int
    pp: int
    store_path: str | None  # a FileStore in the driver's private folder; None: torchrun's MASTER_ADDR/PORT
    device: str  # "cpu", or "cuda" (each rank takes cuda:<local rank>)
    threads: int  # 0: this node's cores / its ranks (LOCAL_WORLD_SIZE)
    build: Callable[[torch.device], nn.Module]  # picklable: a module-level function or functools.partial
    collective_timeout_s: float
    local_rank: int | None = None

    @property
    def backend(self) -> str:
        return "nccl" if self.device == "cuda" else "gloo"


def _tensor_from_bytes(data: bytes, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    if not data:
        return torch.empty(shape, dtype=getattr(torch, dtype))
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(getattr(torch, dtype)).reshape(shape)


class _TensorPickler(pickle.Pickler):
    """CPU tensors as their raw bytes: torch's own pickling goes through torch.save (a zip archive per
    tensor), which cost about 1 ms per engine step; shared memory would leak file descriptors under load."""

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor) and obj.device.type == "cpu" and not obj.requires_grad:
            flat = obj.detach().contiguous().view(-1)
            data = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
            return _tensor_from_bytes, (data, str(obj.dtype).removeprefix("torch."), tuple(obj.shape))
        return NotImplemented


def send(conn: Connection, message: Any) -> None:
    buffer = io.BytesIO()
    _TensorPickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(message)
    conn.send_bytes(buffer.getbuffer())


def receive(conn: Connection) -> Any:
    return pickle.loads(conn.recv_bytes())


def portable(error: BaseException) -> BaseException:
    """The exception itself if it survives pickling (its type and message reach the caller), else a
    RuntimeError that names its type."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")


def _exit_when_driver_dies(lifeline: Connection) -> None:
    """The driver never writes to the lifeline: recv returns (EOF) only when the driver process is gone,
    and then this worker must not outlive it, even in the middle of a step."""
    try:
        lifeline.recv_bytes()
    except (EOFError, OSError):
        pass
    os._exit(0)


def _is_staged_model(model: nn.Module) -> bool:
    """A model of energon_hf.models (built from a checkpoint). Looked up, not imported: the workers of a
    custom model never import that package, and transformers with it (seconds of start-up per rank); a
    StagedModel instance implies its module is loaded."""
    staged = sys.modules.get("energon_hf.models.staged")
    return staged is not None and isinstance(model, staged.StagedModel)


def _listen_on_loopback() -> None:
    """Gloo and NCCL open their ranks' connections on the interface that the hostname resolves to, which on
    many machines is reachable from the network; ranks on one machine need only the loopback interface."""
    loopback = next((name for _, name in socket.if_nameindex() if name.startswith("lo")), None)
    if loopback is not None:
        for variable in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
            os.environ.setdefault(variable, loopback)


class Worker:
    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        local = spec.rank if spec.local_rank is None else spec.local_rank
        self.device = torch.device(f"cuda:{local}") if spec.device == "cuda" else torch.device("cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        store = None
        if spec.store_path is not None:  # one machine: nothing of the engine listens beyond loopback
            store = dist.FileStore(spec.store_path, spec.tp * spec.pp)
            _listen_on_loopback()
        init_parallel(spec.tp, spec.pp, spec.rank, store, spec.backend,
                      timeout=timedelta(seconds=spec.collective_timeout_s))
        start = time.perf_counter()
        self.model = spec.build(self.device)
        self.build_s = time.perf_counter() - start
        st = state()
        dtype = next((p.dtype for p in self.model.parameters() if not p.is_meta), torch.float32)
        staged = _is_staged_model(self.model) and st.pp_size > 1  # custom models stage themselves
        layers = stage_layers(len(self.model.layer_list), st.pp_size, st.pp_rank) if staged else None
        self.runner = LocalRunner(self.model, self.device, dtype, layers)
        self.stage = PipelineStage(self.runner, self.model.config.hidden_size, dtype, self.device) if layers else None

    @property
    def is_output_rank(self) -> bool:
        st = state()
        return st.is_last_stage and st.tp_rank == 0

    def stats(self) -> dict[str, Any]:
        """What this rank holds: its place, layers, loaded parameter bytes and peak memory."""
        st = state()
        params = weight_bytes(self.model)
        layers = self.runner.layers
        return {"rank": st.rank, "tp_rank": st.tp_rank, "pp_rank": st.pp_rank, "pid": os.getpid(),
                "layers": None if layers is None else [layers.start, layers.stop], "param_bytes": params,
                "peak_rss_bytes": peak_rss_bytes(), "build_s": self.build_s,
                "process_cpu_s": time.process_time()}

    def _forward(self, batch, use_cache: bool = False) -> Any:
        """This rank's part of the model on the step's batch: its pipeline stage, or the whole model."""
        return self.stage.run(batch, use_cache) if self.stage else self.runner.run(batch, use_cache)

    @torch.inference_mode()
    def handle(self, op: str, args: tuple) -> Any:
        if op == "run":
            return self._forward(*args)
        if op == "step":  # a generation step: only the output rank holds its logits and samples them
            batch, plan = args
            outputs = self._forward(batch, True)
            return self.runner.samplers.sample(outputs["logits"], plan) if self.is_output_rank else None
        if op == "ensure_cache":
            return self.runner.ensure_cache(*args)
        if op == "stats":
            return self.stats()
        if op == "call":  # a custom model: the user's forward on plain arguments
            inputs, kwargs = args
            inputs = tuple(t.to(self.device) if isinstance(t, torch.Tensor) else t for t in inputs)
            if state().pp_size > 1:
                return call_stage(self.model, inputs, kwargs, self.device)
            return self.model(*inputs, **kwargs)
        raise ValueError(f"unknown engine operation {op!r}")


def _read_spec(conn: Connection) -> WorkerSpec:
    """The driver sends its sys.path and main script, then the pickled spec. A model factory defined in the
    driver's main script is found by running that script as `__mp_main__`, as multiprocessing's spawn does
    (so such a script needs the `if __name__ == "__main__":` guard)."""
    sys_path, main_path = receive(conn)
    if sys_path is not None:  # same machine: import what the driver can import
        sys.path[:] = sys_path
    payload = conn.recv_bytes()
    try:
        return pickle.loads(payload)
    except AttributeError:
        if not main_path:
            raise
        main = sys.modules["__mp_main__"] = sys.modules["__main__"] = type(sys)("__mp_main__")
        main.__dict__.update(runpy.run_path(main_path, run_name="__mp_main__"))
        return pickle.loads(payload)


EVERY_RANK_ANSWERS = ("stats",)  # operations whose result the driver wants from every rank, not one


def worker_main(conn: Connection, lifeline: Connection, local_rank: int | None = None) -> None:
    threading.Thread(target=_exit_when_driver_dies, args=(lifeline,), daemon=True).start()
    try:
        spec = _read_spec(conn)
        if local_rank is not None:
            spec = replace(spec, local_rank=local_rank)
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", spec.tp * spec.pp))
        torch.set_num_threads(spec.threads or max(1, (os.cpu_count() or 1) // local_ranks))
        worker = Worker(spec)
    except BaseException as e:  # noqa: BLE001 - every failure must reach the driver
        send(conn, ("error", portable(e), traceback.format_exc()))
        return
    send(conn, ("ok", None))
    while True:
        try:
            op, args = receive(conn)
        except (EOFError, OSError):
            break
        if op == "stop":
            break
        try:
            result = worker.handle(op, args)
            answers = worker.is_output_rank or op in EVERY_RANK_ANSWERS
            send(conn, ("ok", _to_cpu(result) if answers else None))
        except Exception as e:  # noqa: BLE001
            send(conn, ("error", portable(e), traceback.format_exc()))
    if dist.is_initialized():
        dist.destroy_process_group()


def _to_cpu(result: Any) -> Any:
    if isinstance(result, torch.Tensor):
        return result.cpu()
    if isinstance(result, dict):
        return {k: _to_cpu(v) for k, v in result.items()}
    if isinstance(result, (list, tuple)):
        return type(result)(_to_cpu(v) for v in result)
    return result

