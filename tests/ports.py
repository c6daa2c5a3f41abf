"""A free TCP port and a clean environment for the rendezvous of a multi-process test run.

Fixed or pid-derived ports can clash with another test run on the same machine (or with a socket
of an earlier run still in TIME_WAIT); asking the kernel for an unused port per run avoids both.
"""

from __future__ import annotations

import os
import socket


def free_port() -> int:
    """An unused localhost port (bound to port 0 and released; taken again only by a rare race)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: variables an earlier in-process run can leave behind (Lightning's launcher sets LOCAL_RANK, NODE_RANK,
#: MASTER_ADDR/PORT in the launching process); a child that inherits LOCAL_RANK believes it was already
#: launched and waits forever for ranks nobody starts
RENDEZVOUS = ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK",
              "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID")


def launch_env(**extra: str) -> dict[str, str]:
    """``os.environ`` without rendezvous variables, one thread, a free ``MASTER_PORT``, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS}
    env.update(OMP_NUM_THREADS="1", MASTER_PORT=str(free_port()))
    env.update(extra)
    return env
