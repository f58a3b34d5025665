"""The coordinator's listen address, checked before anything starts.

A port that another process holds is found by binding it first, with a plain
socket as gRPC would bind it (SO_REUSEADDR, no SO_REUSEPORT), so `tiesfed
coordinator serve` fails in one line naming the address before it starts Ray
or recovers its spool, not minutes later with gRPC's "Failed to bind".
"""

from __future__ import annotations

import errno
import socket


def split_listen(listen: str) -> tuple[str, int]:
    """(host, port) of `host:port` or `[v6]:port`; ValueError naming --listen otherwise."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"--listen {listen!r} must be HOST:PORT (e.g. 127.0.0.1:50051; port 0 picks a free one)")
    return host.strip("[]"), int(port)


def check_listen(listen: str) -> None:
    """Raise OSError (one line, naming `listen`) if no address it resolves to can be bound now.

    Port 0 (a free port picked at bind) always passes. The socket is closed again at
    once: gRPC binds for real a moment later."""
    host, port = split_listen(listen)
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise OSError(f"cannot listen on {listen}: {e.strerror}") from None
    first: OSError | None = None
    for family, kind, proto, _, addr in infos:
        try:
            with socket.socket(family, kind, proto) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC: TIME_WAIT is no clash
                s.bind(addr)
            return  # gRPC listens if any of the addresses binds
        except OSError as e:
            first = first or e
    if first is not None and first.errno == errno.EADDRINUSE:
        raise OSError(f"cannot listen on {listen}: port {port} is already in use (another coordinator? "
                      "--listen HOST:0 picks a free port)")
    why = first.strerror if first is not None and first.strerror else "no address to bind"
    raise OSError(f"cannot listen on {listen}: {why}")
