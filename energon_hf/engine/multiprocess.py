"""The driver side of the multi-process engine: the caller's process starts tp*pp worker ranks and makes
them behave like one device (the same `run` / `ensure_cache` as LocalRunner).

Control is event-driven: the driver blocks in `multiprocessing.connection.wait` on the workers' sockets;
only the worker holds the other end, so a reply and a dying worker (end of file) both wake it at once.
Tensors of a step travel pickled through the sockets; the ranks talk to each other with torch.distributed.
"""

from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
import threading
import weakref
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from energon_hf.errors import EngineDeadError

from .batch import PackedBatch
from .worker import EVERY_RANK_ANSWERS, WorkerSpec, receive, send

STOP_GRACE_S = 5.0


def _shutdown(processes: list[subprocess.Popen], conns: list[Connection], lifelines: list[Connection]) -> None:
    """Stop every worker: ask politely, then terminate, then kill. Safe to call twice."""
    for conn in conns:
        try:
            send(conn, ("stop", ()))
        except (OSError, ValueError):
            pass
    for process in processes:
        for stop in (None, process.terminate, process.kill):
            if stop is not None:
                stop()
            try:
                process.wait(STOP_GRACE_S)
                break
            except subprocess.TimeoutExpired:
                continue
    for conn in (*conns, *lifelines):
        conn.close()


def _start_worker(spec: WorkerSpec) -> tuple[subprocess.Popen, Connection, Connection]:
    """A fresh interpreter running the worker; it gets a control socket and a lifeline (never written:
    it reads end of file when this process is gone)."""
    control, control_theirs = socket.socketpair()
    lifeline, lifeline_theirs = socket.socketpair()
    fds = (control_theirs.fileno(), lifeline_theirs.fileno())
    process = subprocess.Popen([sys.executable, "-P", "-m", "energon_hf.engine", *map(str, fds)],
                               pass_fds=fds, stdin=subprocess.DEVNULL)
    control_theirs.close()
    lifeline_theirs.close()
    conn = Connection(control.detach())
    main_path = getattr(sys.modules["__main__"], "__file__", None)
    send(conn, (list(sys.path), main_path))
    conn.send_bytes(pickle.dumps(spec, protocol=pickle.HIGHEST_PROTOCOL))
    return process, conn, Connection(lifeline.detach())


class MultiProcessRunner:
    """tp*pp worker processes (gloo on CPU, NCCL on CUDA) driven from this process.

    Thread-safe: one step runs at a time. A worker exception reaches the caller with its type and message
    and the engine stays usable; a worker that dies fails the pending call and every later one with
    EngineDeadError, and the others are stopped. `close()`, garbage collection and interpreter exit stop
    the workers; a worker whose driver dies exits by itself.
    """

    def __init__(self, build: Callable[[torch.device], nn.Module], tp: int = 1, pp: int = 1, device: str = "cpu",
                 threads_per_rank: int | None = None, collective_timeout_s: float = 300.0):
        if tp < 1 or pp < 1:
            raise ValueError(f"tp and pp must be >= 1, got tp={tp}, pp={pp}")
        self.world_size = tp * pp
        device = torch.device(device).type
        if device == "cuda" and torch.cuda.device_count() < self.world_size:
            raise ValueError(f"tp*pp={self.world_size} ranks need as many GPUs; {torch.cuda.device_count()} visible")
        threads = threads_per_rank or max(1, (os.cpu_count() or 1) // self.world_size)
        # The driver hosts the rendezvous store on a free port: engines side by side never collide.
        self._store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
        self._processes: list[subprocess.Popen] = []
        self._conns: list[Connection] = []
        lifelines: list[Connection] = []  # held open (never written) for as long as the engine lives
        self._finalizer = weakref.finalize(self, _shutdown, self._processes, self._conns, lifelines)
        for rank in range(self.world_size):
            spec = WorkerSpec(rank, tp, pp, "127.0.0.1", self._store.port, device, threads, build,
                              collective_timeout_s)
            process, conn, lifeline = _start_worker(spec)
            self._processes.append(process)
            self._conns.append(conn)
            lifelines.append(lifeline)
        self._lock = threading.Lock()
        self._dead: str | None = None
        self.kv_cache = None  # lives on the workers; kept for LocalRunner's interface
        try:
            with self._lock:
                self._collect()  # every rank loaded its share, or the first error is raised here
        except BaseException:
            self.close()
            raise

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._processes]

    # -- the runner interface ----------------------------------------------------------------------
    def run(self, batch: PackedBatch, use_cache: bool = False) -> dict[str, torch.Tensor]:
        return self.request("run", batch.to("cpu"), use_cache)

    def ensure_cache(self, num_blocks: int, block_size: int) -> None:
        self.request("ensure_cache", num_blocks, block_size)

    def call(self, *args: Any, **kwargs: Any) -> Any:
        """A custom model's forward on every rank; returns the output rank's result."""
        return self.request("call", args, kwargs)

    def rank_stats(self) -> list[dict[str, Any]]:
        """Per rank: its tp/pp place, layers, loaded parameter bytes and peak RSS."""
        return self.request("stats")

    # -- control ---------------------------------------------------------------------------------
    def request(self, op: str, *args: Any) -> Any:
        with self._lock:
            self._check_alive()
            try:
                for conn in self._conns:
                    send(conn, (op, args))
            except (OSError, ValueError):
                self._check_alive()
                raise
            return self._collect(every_rank=op in EVERY_RANK_ANSWERS)

    def _check_alive(self) -> None:
        if self._dead is None:
            for rank, process in enumerate(self._processes):
                if process.poll() is not None:
                    self._died(rank)
        if self._dead is not None:
            raise EngineDeadError(self._dead)

    def _died(self, rank: int) -> None:
        process = self._processes[rank]
        if self._dead is None:
            try:
                code = process.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                code = "unknown (it closed its connection)"
            self._dead = (f"worker rank {rank} (pid {process.pid}) died with exit code {code}; "
                          f"the engine is stopped: load the model again to continue")
        self._finalizer()
        raise EngineDeadError(self._dead)

    def _collect(self, every_rank: bool = False) -> Any:
        """Wait for every rank's answer to the current step; returns the output rank's result or raises
        the first error."""
        pending = {conn: rank for rank, conn in enumerate(self._conns)}
        answers, error = {}, None
        while pending:
            for ready in wait(list(pending)):
                try:
                    status, *payload = receive(ready)
                except (EOFError, OSError):  # only the worker holds the other end: it is gone
                    self._died(pending[ready])
                rank = pending.pop(ready)
                if status == "error" and error is None:
                    error = (rank, *payload)
                elif status == "ok" and payload[0] is not None:
                    answers[rank] = payload[0]
        if error is not None:
            rank, exc, trace = error
            exc.add_note(f"(raised in worker rank {rank})\n{trace}")
            raise exc
        if every_rank:
            return [answers.get(rank) for rank in range(self.world_size)]
        return next(iter(answers.values()), None)

    def close(self) -> None:
        with self._lock:
            if self._dead is None:
                self._dead = "the engine was closed"
            self._finalizer()
        self._store = None
