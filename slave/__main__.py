"""`python -m slave`: the slave daemon."""
import os
import sys

import zmq

from slave.daemon import main

code = main()
# Its goodbye out (the closed socket's linger honoured), a slave that ended has nothing left to free: the
# interpreter's teardown took 0.05-0.3 s of a busy machine, which a local run waited for after its last result.
zmq.Context.instance().destroy(linger=0)
for stream in (sys.stdout, sys.stderr):
    try:
        stream.flush()
    except (OSError, ValueError):  # a closed pipe: nothing more can reach the reader
        pass
os._exit(code)
