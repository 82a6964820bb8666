"""Internal: `python -P -m energon_hf.engine CONTROL_FD LIFELINE_FD` is one worker rank, started by the driver
(energon_hf.engine.multiprocess) with the two sockets it passes down."""

import os
import sys
from multiprocessing.connection import Connection

from energon_hf.engine.worker import worker_main

worker_main(Connection(int(sys.argv[1])), Connection(int(sys.argv[2]), writable=False))
# Done (stopped, or its start failed and the driver was told why). Skip the interpreter's teardown of torch
# and transformers: it takes seconds on a small machine, and the driver's close() waits for this exit.
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
