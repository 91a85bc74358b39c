"""Running the app: one uvicorn server on a socket bound here (so port 0 gives a free port and the URL printed
is the one that answers)."""
from __future__ import annotations

import ipaddress
import signal
import socket
import threading
from typing import Callable

LOOPBACK_NAMES = ("localhost",)


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    from retrieval.errors import RetrieveError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        hint = "; choose another with --port" if e.errno in (98, 48) else ""
        raise RetrieveError(f"cannot listen on {host}:{port} ({e.strerror}){hint}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def serve(app, sock: socket.socket, log_level: str = "warning", on_ready: Callable[[str], None] | None = None) -> None:
    """Serve ``app`` on the bound ``sock`` until interrupted."""
    import uvicorn

    config = uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="off", timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    host, port = sock.getsockname()[:2]
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)  # all addresses: this machine's opens it
    shown = f"[{host}]" if ":" in host else host
    # uvicorn stops gracefully on SIGTERM, then raises the signal again with the handler it found: that handler ends
    # the process by an exception, so the caller's cleanup (the uploads' temporary folder) still runs. Set before the
    # address is announced: a SIGTERM sent as soon as it is printed finds it
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminated) if main else None
    try:
        if on_ready:
            on_ready(f"http://{shown}:{port}/")
        server.run(sockets=[sock])
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)


def _terminated(signum, frame) -> None:
    raise SystemExit(0)
