"""`bearpaw serve --processes N`: N uvicorn workers, one listening socket each.

uvicorn's own multi-worker mode hands one listening socket to every worker, and
a burst of new connections is accepted by whichever worker wakes first: on the
2-core box all 16 connections of a `wrk -c16` run landed on one of two workers
while the other stayed idle (bench/processes.py), so a second process bought
nothing for a client with a fixed set of keep-alive connections. Here every
worker binds its own socket to the same address with SO_REUSEPORT and the
kernel spreads new connections over them by a hash of their addresses.

The supervisor holds a bound (not listening) socket of the same group for its
whole life, so the port stays reserved while a worker restarts, and port 0
picks one port for all of them. It forwards SIGINT/SIGTERM to the workers
(each drains as a single `uvicorn` process does), restarts a worker that dies,
and gives up when one fails during startup.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any

log = logging.getLogger("bearpaw.supervisor")

# uvicorn's exit status for a worker that could not start (config.STARTUP_FAILURE).
STARTUP_FAILURE = 3


def reuseport_supported() -> bool:
    """SO_REUSEPORT with load spreading across listeners is Linux's (3.9+)."""
    return sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")


def bind_reuseport(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def worker_main(argv: list[str] | None = None) -> None:
    """One worker: its own SO_REUSEPORT socket, then a plain uvicorn server."""
    import uvicorn

    spec = json.loads((argv or sys.argv[1:])[0])
    _die_with_parent(spec["parent"])
    sock = bind_reuseport(spec["host"], spec["port"])
    config = uvicorn.Config("gateway.main:app", **spec["uvicorn"])
    uvicorn.Server(config).run(sockets=[sock])


def _die_with_parent(parent: int) -> None:
    # A supervisor killed outright (SIGKILL) cannot stop its workers; the
    # kernel sends them SIGTERM instead, so none keeps serving the port alone.
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it died before the request took effect
        sys.exit(1)


class Supervisor:
    def __init__(
        self, host: str, port: int, processes: int, uvicorn_options: dict[str, Any]
    ) -> None:
        self.host = host
        self.processes = processes
        self.options = uvicorn_options
        # Fails here, once, when the address is taken; and fixes port 0.
        self.reserved = bind_reuseport(host, port)
        self.port = int(self.reserved.getsockname()[1])
        self.children: list[subprocess.Popen[bytes]] = []
        self.stopping = False

    def _start(self) -> subprocess.Popen[bytes]:
        spec = json.dumps(
            {"host": self.host, "port": self.port, "uvicorn": self.options, "parent": os.getpid()}
        )
        code = "from gateway.cli.supervisor import worker_main; worker_main()"
        # Its own session: a terminal's Ctrl-C reaches the supervisor only, which
        # forwards it once (a second SIGINT makes uvicorn skip its drain).
        return subprocess.Popen([sys.executable, "-c", code, spec], start_new_session=True)

    def _forward(self, signum: int, _frame: object) -> None:
        self.stopping = True
        for child in self.children:
            if child.poll() is None:
                child.send_signal(signum)

    def run(self) -> int:
        """Serves until SIGINT/SIGTERM; returns the exit status."""
        previous = {
            sig: signal.signal(sig, self._forward) for sig in (signal.SIGINT, signal.SIGTERM)
        }
        status = 0
        try:
            self.children = [self._start() for _ in range(self.processes)]
            while not (self.stopping and all(c.poll() is not None for c in self.children)):
                for i, child in enumerate(self.children):
                    code = child.poll()
                    if code is None or self.stopping:
                        continue
                    if code == STARTUP_FAILURE:
                        # The app or its config is broken: every restart would fail alike.
                        log.error("worker %s failed to start; stopping", child.pid)
                        status = code
                        self._forward(signal.SIGTERM, None)
                        break
                    log.warning("worker %s exited with %s; restarting it", child.pid, code)
                    self.children[i] = self._start()
                time.sleep(0.2)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            for child in self.children:
                if child.poll() is None:
                    child.kill()
                    child.wait()
            self.reserved.close()
        return status
