"""Cutting a client off: what ASGI cannot say."""

from __future__ import annotations

from starlette.types import Receive


def abort(receive: Receive) -> None:
    """Drop the connection of `receive` (an ASGI app's) now, with whatever it has
    not sent yet.

    An app that ends without finishing its response (or without closing its
    WebSocket) makes uvicorn `close()` the transport, and a transport closes only
    once its write buffer has drained: never, for a client that stopped reading.
    uvicorn's `receive` is a bound method of the request's cycle (HTTP) or of the
    connection's protocol (WebSocket), and both hold the asyncio / uvloop
    transport, whose `abort()` closes the socket at once (what the kernel already
    holds still goes out, then the end). Under a server without those attributes
    nothing happens.
    """
    transport = getattr(getattr(receive, "__self__", None), "transport", None)
    if callable(close_now := getattr(transport, "abort", None)):
        close_now()
