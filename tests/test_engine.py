"""The multi-process engine with real worker processes over gloo: custom models, worker exceptions,
killed workers, concurrency, and no process left behind."""

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from engine_models import HIDDEN, build_broken, build_mlp, build_stage, unsplit_mlp

from energon_hf import EngineDeadError, launch

TESTS = Path(__file__).resolve().parent


def alive(pid: int) -> bool:
    """Running (a zombie waiting to be reaped counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def wait_gone(pids: list[int], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(alive(p) for p in pids):
            return True
        time.sleep(0.1)
    return False


@pytest.fixture(scope="module")
def mlp():
    with launch(build_mlp, tp=2, threads_per_rank=1) as model:
        yield model


def test_col_row_mlp_gives_the_unsplit_output(mlp):
    x = torch.randn(5, HIDDEN)
    assert (mlp(x) - unsplit_mlp(x)).abs().max() < 1e-5


@pytest.mark.parametrize("tp", [1, 2])
def test_custom_pipeline_stages(tp):
    """pp=2: each rank builds its stage; the first gets the caller's input, the second the first's output."""
    with launch(build_stage, tp=tp, pp=2, threads_per_rank=1) as model:
        x = torch.randn(4, HIDDEN)
        assert (model(x) - unsplit_mlp(unsplit_mlp(x, seed=0), seed=1)).abs().max() < 1e-5


def test_worker_exception_reaches_the_caller_and_the_engine_stays_usable(mlp):
    with pytest.raises(KeyError, match="asked for an error") as info:
        mlp(torch.zeros(1, HIDDEN), mode="raise")
    assert any("worker rank" in note for note in info.value.__notes__)
    x = torch.randn(2, HIDDEN)
    assert (mlp(x) - unsplit_mlp(x)).abs().max() < 1e-5


def test_concurrent_callers_get_their_own_results(mlp):
    inputs = [torch.randn(i + 1, HIDDEN) for i in range(8)]
    results: dict[int, torch.Tensor] = {}

    def call(i: int) -> None:
        results[i] = mlp(inputs[i])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(results) == list(range(8))
    for i, x in enumerate(inputs):
        assert (results[i] - unsplit_mlp(x)).abs().max() < 1e-5


def test_two_engines_run_side_by_side_and_with_stops_every_worker(mlp):
    """A second engine next to the module's; leaving its `with` block stops its workers, not the other's."""
    with launch(build_mlp, tp=2, threads_per_rank=1) as other:
        pids = other.runner.pids
        assert all(alive(p) for p in pids)
        x = torch.randn(3, HIDDEN)
        assert torch.allclose(other(x), mlp(x), atol=1e-6)
    assert wait_gone(pids)
    with pytest.raises(EngineDeadError, match="closed"):
        other(torch.zeros(1, HIDDEN))
    assert (mlp(x) - unsplit_mlp(x)).abs().max() < 1e-5


def test_a_factory_error_reaches_the_caller_and_no_worker_stays():
    before = set(_children())
    with pytest.raises(RuntimeError, match="cannot build its model"):
        launch(build_broken, tp=2, threads_per_rank=1)
    assert wait_gone(list(set(_children()) - before))


def test_killed_worker_fails_pending_and_new_calls_quickly(tmp_path):
    model = launch(build_mlp, tp=2, threads_per_rank=1)
    pids = model.runner.pids
    errors: list[BaseException] = []
    marker = str(tmp_path / "sleeping")
    pending = threading.Thread(target=lambda: _record(errors, model, torch.zeros(1, HIDDEN), mode="sleep",
                                                      marker=marker))
    pending.start()
    deadline = time.monotonic() + 30
    while not all(os.path.exists(f"{marker}.{pid}") for pid in pids):  # the call is blocked inside the workers
        assert time.monotonic() < deadline and pending.is_alive()
        time.sleep(0.01)
    start = time.monotonic()
    os.kill(pids[1], signal.SIGKILL)
    pending.join(15)
    assert not pending.is_alive() and time.monotonic() - start < 10
    assert isinstance(errors[0], EngineDeadError) and "worker rank 1" in str(errors[0])
    with pytest.raises(EngineDeadError, match="died"):
        model(torch.zeros(1, HIDDEN))
    assert wait_gone(pids)
    model.close()


@pytest.mark.parametrize("ending", ["return", "sigkill"])
def test_no_orphan_when_the_driver_exits_without_close(tmp_path, ending):
    """Interpreter exit runs the engine's finalizer; a driver killed outright leaves its workers reading
    end of file on their lifeline, and they exit."""
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(TESTS)!r})
        from engine_models import build_mlp
        from energon_hf import launch
        model = launch(build_mlp, tp=2, threads_per_rank=1)
        print(*model.runner.pids, flush=True)
        if {ending!r} == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
    """))
    done = subprocess.run([sys.executable, "-P", str(script)], capture_output=True, text=True, timeout=120)
    pids = [int(p) for p in done.stdout.split()]
    assert len(pids) == 2, done.stderr[-2000:]
    assert wait_gone(pids), f"workers {pids} outlived their driver"


def _record(errors: list, model, *args, **kwargs) -> None:
    try:
        model(*args, **kwargs)
    except BaseException as e:  # noqa: BLE001
        errors.append(e)


def _children() -> list[int]:
    """Live child processes of this process, from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == os.getpid() and fields[0] not in ("Z", "X"):
                found.append(int(entry.name))
    return found


def test_peak_rss_is_the_workers_own_not_its_spawners():
    """A rank's reported peak memory starts afresh in the worker: getrusage's ru_maxrss would carry over the
    high-water mark of the driver that spawned it (Linux keeps it across exec), e.g. a driver holding a model."""
    ballast = bytearray(1 << 30)  # 1 GiB, touched so that it is resident in this (spawning) process
    ballast[::4096] = b"\1" * len(range(0, len(ballast), 4096))
    code = "from energon_hf.engine.worker import peak_rss_bytes; print(peak_rss_bytes())"
    child = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, child.stderr
    assert 0 < int(child.stdout) < 800 << 20  # torch's import alone; the 1 GiB ballast never counts
    del ballast
