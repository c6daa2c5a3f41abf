"""A free TCP port for the rendezvous of a multi-process test run.

Fixed or pid-derived ports can clash with another test run on the same machine (or with a socket
of an earlier run still in TIME_WAIT); asking the kernel for an unused port per run avoids both.
"""

from __future__ import annotations

import socket


def free_port() -> int:
    """An unused localhost port (bound to port 0 and released; taken again only by a rare race)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
