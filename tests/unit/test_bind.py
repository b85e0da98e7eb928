"""The web process's listening socket."""

from __future__ import annotations

import socket

from app.runtime import bind


def test_accepted_connections_send_at_once() -> None:
    """TCP_NODELAY on the listener, inherited by every accepted socket: without it
    each response on a keep-alive connection waited 40 ms for a delayed ACK."""
    listener = bind("127.0.0.1", 0)
    client = socket.create_connection(listener.getsockname())
    accepted, _ = listener.accept()
    try:
        assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        for s in (accepted, client, listener):
            s.close()
