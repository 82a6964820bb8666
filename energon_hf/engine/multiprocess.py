"""The driver side of the multi-process engine: the caller's process starts tp*pp worker ranks and makes
them behave like one device (the same `run` / `ensure_cache` as LocalRunner).

Control is event-driven: the driver blocks in `multiprocessing.connection.wait` on the workers' sockets;
only the worker holds the other end, so a reply and a dying worker (end of file) both wake it at once.
Tensors of a step travel pickled through the sockets; the ranks talk to each other with torch.distributed.
"""

from __future__ import annotations

import os
import pickle
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import replace
from multiprocessing.connection import Connection, Listener, wait
from typing import Any

import torch
from torch import nn

from energon_hf.batch import PackedBatch
from energon_hf.errors import EngineDeadError

from .sampling import Sampled, SamplingPlan
from .worker import EVERY_RANK_ANSWERS, WorkerSpec, receive, send

STOP_GRACE_S = 5.0
ENGINE_KEY_ENV = "ENERGON_HF_ENGINE_KEY"


def _shutdown(processes: list[subprocess.Popen], conns: list[Connection], lifelines: list[Connection],
              graceful: bool = True) -> None:
    """Stop every worker: ask them to stop (graceful), then terminate, then kill, each round waiting at most
    STOP_GRACE_S for all of them together. A broken engine skips the request: its survivors may be stuck in
    a collective with the dead rank."""
    if graceful:
        for conn in conns:
            try:
                send(conn, ("stop", ()))
            except (OSError, ValueError):
                pass
    rounds = [None] if graceful else []  # the first round only waits for the requested stop
    for stop in [*rounds, subprocess.Popen.terminate, subprocess.Popen.kill]:
        running = [p for p in processes if p.poll() is None]
        for process in running if stop else ():
            stop(process)
        deadline = time.monotonic() + STOP_GRACE_S
        for process in running:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
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
    _send_spec(conn, spec, same_machine=True)
    return process, conn, Connection(lifeline.detach())


def _send_spec(conn: Connection, spec: WorkerSpec, same_machine: bool) -> None:
    main_path = getattr(sys.modules["__main__"], "__file__", None)
    send(conn, (list(sys.path), main_path) if same_machine else (None, None))
    conn.send_bytes(pickle.dumps(spec, protocol=pickle.HIGHEST_PROTOCOL))


def engine_key(authkey: str | bytes | None) -> bytes:
    """The shared secret that authenticates driver and remote workers (their messages are pickles)."""
    key = authkey if authkey is not None else os.environ.get(ENGINE_KEY_ENV)
    if not key:
        raise ValueError(f"workers on other machines need a shared key: set {ENGINE_KEY_ENV} (the same on the "
                         f"driver and every torchrun node) or pass authkey=")
    return key.encode() if isinstance(key, str) else key


def _accept_workers(address: str, authkey: bytes, world_size: int,
                    timeout_s: float) -> tuple[list[Connection], list[Connection], list[int]]:
    """Wait for every rank's control and lifeline connections (see energon_hf.node)."""
    host, _, port = address.rpartition(":")
    listener = Listener((host or "0.0.0.0", int(port)), authkey=authkey)
    conns: dict[int, Connection] = {}
    lifelines: dict[int, Connection] = {}
    pids: dict[int, int] = {}
    timer = threading.Timer(timeout_s, listener.close)  # unblocks accept() when the workers do not come
    timer.start()
    try:
        while len(conns) < world_size or len(lifelines) < world_size:
            try:
                conn = listener.accept()
            except OSError as e:
                raise EngineDeadError(f"only {len(conns)} of {world_size} worker ranks connected to {address} "
                                      f"within {timeout_s:.0f} s") from e
            role, rank, world, pid = receive(conn)
            if world != world_size or not 0 <= rank < world_size:
                conn.close()
                raise ValueError(f"a worker with RANK={rank}, WORLD_SIZE={world} connected; this engine needs "
                                 f"tp*pp={world_size} ranks")
            (conns if role == "control" else lifelines)[rank] = conn
            pids[rank] = pid
    finally:
        timer.cancel()
        listener.close()
    return [conns[r] for r in range(world_size)], [lifelines[r] for r in range(world_size)], \
        [pids[r] for r in range(world_size)]


def _seeded_here(plan: SamplingPlan) -> SamplingPlan:
    """A group that draws as transformers does from torch's global generator would draw from the output rank's
    there: it gets a generator seeded from this process's global one instead, so torch.manual_seed still
    makes its draws repeat (pass seed= to generate for transformers' own draws). Generators travel by value:
    one passed to generate is not advanced here."""
    if not any(spec.generator is None and spec.hf_draws for spec in plan.new):
        return plan
    new = [replace(spec, generator=torch.Generator().manual_seed(int(torch.randint(2**62, ()))))
           if spec.generator is None and spec.hf_draws else spec for spec in plan.new]
    return replace(plan, new=new)


class MultiProcessRunner:
    """tp*pp worker processes (gloo on CPU, NCCL on CUDA) driven from this process.

    Thread-safe: one step runs at a time. A worker exception reaches the caller with its type and message
    and the engine stays usable; a worker that dies fails the pending call and every later one with
    EngineDeadError, and the others are stopped. `close()`, garbage collection and interpreter exit stop
    the workers; a worker whose driver dies exits by itself.
    """

    def __init__(self, build: Callable[[torch.device], nn.Module], tp: int = 1, pp: int = 1, device: str = "cpu",
                 threads_per_rank: int | None = None, collective_timeout_s: float = 300.0,
                 driver_address: str | None = None, authkey: str | bytes | None = None,
                 connect_timeout_s: float = 300.0):
        """`driver_address` ("host:port"): do not start workers here; listen there for tp*pp ranks started
        elsewhere under torchrun (`python -m energon_hf.node --driver host:port`), authenticated by
        `authkey` (default: $ENERGON_HF_ENGINE_KEY)."""
        if tp < 1 or pp < 1:
            raise ValueError(f"tp and pp must be >= 1, got tp={tp}, pp={pp}")
        self.world_size = tp * pp
        device = torch.device(device).type
        local = driver_address is None
        if local and device == "cuda" and torch.cuda.device_count() < self.world_size:
            raise ValueError(f"tp*pp={self.world_size} ranks need as many GPUs; {torch.cuda.device_count()} visible")
        self._processes: list[subprocess.Popen] = []
        self._conns: list[Connection] = []
        self._lifelines: list[Connection] = []  # held open (never written) for as long as the engine lives
        lifelines = self._lifelines
        self._finalizer = weakref.finalize(self, _shutdown, self._processes, self._conns, lifelines)
        self._lock = threading.Lock()
        self._dead: str | None = None
        self.kv_cache = None  # lives on the workers; kept for LocalRunner's interface
        if local:
            threads = threads_per_rank or max(1, (os.cpu_count() or 1) // self.world_size)
            # The rendezvous is a file in a folder only this user can read: no port (a TCPStore listens on
            # every interface, unauthenticated), and engines side by side never collide.
            folder = tempfile.mkdtemp(prefix="energon-rendezvous-")
            weakref.finalize(self, shutil.rmtree, folder, True)
            for rank in range(self.world_size):
                spec = WorkerSpec(rank, tp, pp, os.path.join(folder, "store"), device, threads, build,
                                  collective_timeout_s)
                process, conn, lifeline = _start_worker(spec)
                self._processes.append(process)
                self._conns.append(conn)
                lifelines.append(lifeline)
            self._pids = [p.pid for p in self._processes]
        else:  # torchrun started the ranks and does their rendezvous (MASTER_ADDR / MASTER_PORT)
            conns, remote_lifelines, self._pids = _accept_workers(driver_address, engine_key(authkey),
                                                                  self.world_size, connect_timeout_s)
            self._conns.extend(conns)
            lifelines.extend(remote_lifelines)
            for rank, conn in enumerate(conns):
                _send_spec(conn, WorkerSpec(rank, tp, pp, None, device, threads_per_rank or 0, build,
                                            collective_timeout_s), same_machine=False)
        try:
            with self._lock:
                self._collect()  # every rank loaded its share, or the first error is raised here
        except BaseException:
            self.close()
            raise

    @property
    def broken(self) -> str | None:
        """Why the engine cannot run steps any more (a worker died, or it was closed), or None. Looks at the
        lifelines, so a worker that dies while the engine is idle is seen at once (a health check), not only
        by the next step."""
        if self._dead is None and self._lifelines:
            ended = wait(self._lifelines, timeout=0)  # never written: readable means end of file
            if ended and self._lock.acquire(blocking=False):  # else the step in flight sees it
                try:
                    self._died(self._lifelines.index(ended[0]))
                except EngineDeadError:
                    pass
                finally:
                    self._lock.release()
            elif ended:
                return f"worker rank {self._lifelines.index(ended[0])} died"
        return self._dead

    @property
    def pids(self) -> list[int]:
        """Worker process ids (on their own machines, for ranks started by torchrun)."""
        return list(self._pids)

    # -- the runner interface ----------------------------------------------------------------------
    def run(self, batch: PackedBatch, use_cache: bool = False) -> dict[str, torch.Tensor]:
        return self.request("run", batch.to("cpu"), use_cache)

    def step(self, batch: PackedBatch, plan: SamplingPlan) -> Sampled:
        """A generation step, sampled on the output rank (engine/sampling.py): only token ids come back."""
        return self.request("step", batch.to("cpu"), _seeded_here(plan))

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
        if self._dead is None:
            code = "unknown (it closed its connection)"
            if self._processes:
                try:
                    code = self._processes[rank].wait(STOP_GRACE_S)
                except subprocess.TimeoutExpired:
                    pass
            self._dead = (f"worker rank {rank} (pid {self._pids[rank]}) died with exit code {code}; "
                          f"the engine is stopped: load the model again to continue")
        if self._finalizer.detach() is not None:  # the survivors may be waiting on the dead rank: no grace
            _shutdown(self._processes, self._conns, self._lifelines, graceful=False)
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
