"""Helpers shared by the serving tests."""

from __future__ import annotations

import threading
import time

import uvicorn

WAIT = 30  # seconds: an upper bound on any wait, never a sleep


def serve_in_thread(app, server_class=uvicorn.Server, **config):
    """(server, thread, port): ``app`` served on a free loopback port by ``server_class`` in a daemon thread."""
    srv = server_class(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", **config))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + WAIT
    while not srv.started and time.monotonic() < deadline:
        threading.Event().wait(0.05)
    return srv, thread, srv.servers[0].sockets[0].getsockname()[1]
