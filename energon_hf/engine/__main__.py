"""Internal: `python -P -m energon_hf.engine CONTROL_FD LIFELINE_FD` is one worker rank, started by the driver
(energon_hf.engine.multiprocess) with the two sockets it passes down."""

import sys
from multiprocessing.connection import Connection

from energon_hf.engine.worker import worker_main

worker_main(Connection(int(sys.argv[1])), Connection(int(sys.argv[2]), writable=False))
