"""A worker rank started by torchrun, for engines that span machines:

    # on every node (the driver runs elsewhere: EnergonModel.from_pretrained(..., driver_address="HOST:PORT"))
    export ENERGON_HF_ENGINE_KEY=<shared secret>
    torchrun --nnodes 2 --node-rank K --nproc-per-node G --master-addr NODE0 --master-port 29500 \\
        -m energon_hf.node --driver HOST:PORT

torchrun gives each process its RANK, WORLD_SIZE and LOCAL_RANK and does the torch.distributed rendezvous
(MASTER_ADDR / MASTER_PORT); the process connects to the driver twice (control and lifeline, both
authenticated with the shared key), receives what to build, and serves steps until the driver stops it
or goes away.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from multiprocessing.connection import Client, Connection

from energon_hf.engine.multiprocess import engine_key
from energon_hf.engine.worker import send, worker_main


def connect(address: str, authkey: bytes, timeout_s: float) -> Connection:
    """The driver may start after its workers: retry until it listens (start-up only)."""
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return Client((host, int(port)), authkey=authkey)
        except (ConnectionRefusedError, FileNotFoundError, OSError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m energon_hf.node", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--driver", required=True, help="HOST:PORT the driver listens on (driver_address=)")
    parser.add_argument("--connect-timeout", type=float, default=300.0, help="seconds to wait for the driver")
    args = parser.parse_args(argv)
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    except KeyError as e:
        parser.error(f"{e.args[0]} is not set: start this module with torchrun")
    key = engine_key(None)
    control = connect(args.driver, key, args.connect_timeout)
    send(control, ("control", rank, world, os.getpid()))
    lifeline = connect(args.driver, key, args.connect_timeout)
    send(lifeline, ("lifeline", rank, world, os.getpid()))
    worker_main(control, lifeline, local_rank=int(os.environ.get("LOCAL_RANK", 0)))
    return 0


if __name__ == "__main__":
    code = main()
    # As energon_hf.engine's workers: skip the interpreter's slow teardown of torch (torchrun, and the
    # driver's close(), wait for this exit).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
