"""Slow consumers (guarantee 12): a client that stops reading is cut off, and the
server lets go of its connection, over SSE and over WebSocket, whichever limit
cuts it off: the send timeout (`EDDY_SEND_TIMEOUT_S`) or its buffer
(`EDDY_SUBSCRIBER_BUFFER`).

A stalled client here is a raw TCP socket that asks for a feed and never reads
again, with a small receive buffer and a small MSS: Linux sizes a connection's
send buffer from its MSS, and on loopback (64 KiB segments) the server's kernel
would swallow megabytes before a write of the server blocks; with 536-byte
segments about 120 KB do. The server's end of each connection is read from
`/proc/net/tcp` (Linux), so "cut off" means the server closed its socket, not
only that it stopped writing: a transport's plain close waits for its unsent data
to drain, which a stalled client never lets happen (`app.sse.abort`).

`tests/guarantees/test_g12_slow_consumers.py` measures what stalled clients cost
everyone else, under load, against a real `eddy web`; it uses `Stalled` from here.
"""

from __future__ import annotations

import errno
import json
import socket
import time
from pathlib import Path
from typing import Literal

import anyio
import httpx
import msgspec
import pytest
from websockets.client import ClientProtocol
from websockets.frames import Frame as WsFrame
from websockets.frames import Opcode
from websockets.protocol import State
from websockets.uri import parse_uri

from app.auth import issue_token
from core.settings import Settings
from streams.connection import Redis
from streams.keys import Keys
from tests.feeds import event, keys_of
from tests.pipeline import eventually
from tests.stack import serving

WAIT_S = 10
TCP_TABLES = (Path("/proc/net/tcp"), Path("/proc/net/tcp6"))
TCP_STATES = {
    "01": "ESTABLISHED",
    "04": "FIN_WAIT1",
    "05": "FIN_WAIT2",
    "06": "TIME_WAIT",
    "07": "CLOSE",
    "08": "CLOSE_WAIT",
    "09": "LAST_ACK",
    "0B": "CLOSING",
}
OPEN = ("ESTABLISHED", "CLOSE_WAIT")
"""The states in which the server has not closed its end of a connection."""
PAD = "x" * 1000
"""Events of about 1.3 KB on the wire."""

Kind = Literal["sse", "ws"]


def server_sides(server_port: int, client_ports: list[int]) -> dict[int, str | None]:
    """The TCP state of the server's end of the connection from each of
    `client_ports` (None once it is gone), from Linux's `/proc/net/tcp`. One read
    of the table (thousands of lines on a busy machine: ~10 ms), so call it from a
    thread while anything is being timed."""
    local = f":{server_port:04X} "
    remotes = {f":{port:04X} ": port for port in client_ports}
    states: dict[int, str | None] = dict.fromkeys(client_ports)
    for table in TCP_TABLES:
        if not table.exists():
            continue
        for line in table.read_text().splitlines()[1:]:
            if local not in line:
                continue
            fields = line.split()
            port = remotes.get(fields[2][-5:] + " ")
            if port is not None and fields[1].endswith(local[:-1]):
                states[port] = TCP_STATES.get(fields[3], fields[3])
    return states


def server_side(server_port: int, client_port: int) -> str | None:
    return server_sides(server_port, [client_port])[client_port]


def need_tcp_states() -> None:
    if not TCP_TABLES[0].exists():
        pytest.skip("needs Linux's /proc/net/tcp to see the server's end of a connection")


class Stalled:
    """A client that subscribes to a feed, then never reads again (until
    `read_to_end`)."""

    def __init__(self, kind: Kind, sock: socket.socket, server_port: int) -> None:
        self.kind = kind
        self.sock = sock
        self.server_port = server_port
        self.port: int = sock.getsockname()[1]
        self.protocol: ClientProtocol | None = None
        self.read = b""
        """Everything read: while subscribing, and then by `read_to_end`."""

    @classmethod
    async def open(cls, kind: Kind, url: str, token: str, topic: str = "*") -> Stalled:
        """Connect to the server at `url` (`http://host:port`) and subscribe to
        `topic`; return once the server has said it is subscribed."""
        host, port = url.removeprefix("http://").rsplit(":", 1)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 536)
        sock.setblocking(False)
        if (code := sock.connect_ex((host, int(port)))) not in (0, errno.EINPROGRESS):
            sock.close()
            raise OSError(code, "connect failed")
        stalled = cls(kind, sock, int(port))
        with anyio.fail_after(WAIT_S):
            await anyio.wait_writable(sock)
            stalled.port = sock.getsockname()[1]
            if kind == "sse":
                await stalled._open_sse(host, topic, token)
            else:
                await stalled._open_ws(url, topic, token)
        return stalled

    async def _open_sse(self, host: str, topic: str, token: str) -> None:
        self.sock.send(
            f"GET /v1/events/stream?topic={topic}&access_token={token} HTTP/1.1\r\n"
            f"Host: {host}\r\nAccept: text/event-stream\r\n\r\n".encode()
        )
        while True:  # the headers, then the first frame (`id: <position>`)
            await self._receive()
            head, end, body = self.read.partition(b"\r\n\r\n")
            if end:
                assert head.startswith(b"HTTP/1.1 200"), head
            if b"id: " in body:
                return

    async def _open_ws(self, url: str, topic: str, token: str) -> None:
        self.protocol = protocol = ClientProtocol(
            parse_uri(url.replace("http://", "ws://", 1) + "/v1/ws")
        )
        request = protocol.connect()
        request.headers["Authorization"] = f"Bearer {token}"
        protocol.send_request(request)
        self.sock.send(b"".join(protocol.data_to_send()))
        while protocol.state is not State.OPEN:
            protocol.receive_data(await self._receive())
        protocol.send_text(json.dumps({"op": "subscribe", "topic": topic}).encode())
        self.sock.send(b"".join(protocol.data_to_send()))
        while True:
            protocol.receive_data(await self._receive())
            texts = [e.data for e in protocol.events_received() if isinstance(e, WsFrame)]
            if any(json.loads(text)["op"] == "subscribed" for text in texts):
                return

    async def _receive(self) -> bytes:
        await anyio.wait_readable(self.sock)
        data = self.sock.recv(65536)
        self.read += data
        return data

    def server_closed(self) -> bool:
        """Whether the server has closed its end of the connection."""
        return server_side(self.server_port, self.port) not in OPEN

    async def read_to_end(self) -> tuple[int, bytes | int | None]:
        """Read until the server's end of stream (or a reset): the events read
        after subscribing, and how the stream ended (SSE: its last bytes; WebSocket:
        the close code, None without a close frame)."""
        start = len(self.read)
        with anyio.fail_after(WAIT_S):
            while True:
                try:
                    if not await self._receive():
                        break
                except ConnectionResetError:
                    break
        rest = self.read[start:]
        if self.kind == "sse":
            return rest.count(b"\nevent: "), rest[-5:]
        assert self.protocol is not None
        self.protocol.receive_data(rest)
        frames = [e for e in self.protocol.events_received() if isinstance(e, WsFrame)]
        events = sum(f.opcode is Opcode.TEXT and b'"op":"event"' in f.data for f in frames)
        closes = [f for f in frames if f.opcode is Opcode.CLOSE]
        return events, int.from_bytes(closes[0].data[:2]) if closes else None

    def close(self) -> None:
        self.sock.close()


def token_of(settings: Settings, tenant: str = "tenant-a") -> str:
    return issue_token(settings.jwt_secret, tenant=tenant, sub="t", roles=["user"], ttl_s=600)


def encoded_event(aggregate_id: str, version: int, n: int, tenant: str = "tenant-a") -> bytes:
    """An event of `tenant` in chat_sessions (payload `{"n", "pad"}`), encoded."""
    payload = msgspec.json.encode({"n": n, "pad": PAD})
    return msgspec.json.encode(
        event(tenant, "chat_sessions", aggregate_id, version, payload=payload)
    )


def stream_of(keys: Keys, aggregate_id: str, tenant: str = "tenant-a") -> str:
    return keys.event_stream(keys.shard_of("chat_sessions", tenant, aggregate_id))


async def ws_connections(client: httpx.AsyncClient) -> float:
    """`eddy_ws_connections` on the server's `/metrics`."""
    for line in (await client.get("/metrics")).text.splitlines():
        if line.startswith("eddy_ws_connections "):
            return float(line.split()[1])
    raise AssertionError("no eddy_ws_connections on /metrics")


@pytest.mark.parametrize("kind", ["sse", "ws"])
@pytest.mark.parametrize("limit", ["send-timeout", "buffer"])
async def test_a_stalled_client_is_cut_off_and_its_connection_closed(
    settings: Settings, schema: str, redis: Redis, kind: Kind, limit: str
) -> None:
    """`send-timeout`: events keep coming until a write to it blocks longer than
    the send timeout. `buffer`: one burst overflows its buffer while the writes
    to it still go through, and the send timeout is far away."""
    need_tcp_states()
    buffer, send_timeout = (10_000, 0.5) if limit == "send-timeout" else (20, 30.0)
    settings = msgspec.structs.replace(
        settings, subscriber_buffer=buffer, send_timeout_s=send_timeout
    )
    stream = stream_of(keys_of(settings), "s1")
    async with serving(settings, worker=False, projector=False) as stack:
        stalled = await Stalled.open(kind, stack.url, token_of(settings))
        try:
            assert server_side(stalled.server_port, stalled.port) == "ESTABLISHED"
            if kind == "ws":
                assert await ws_connections(stack.client) == 1
            sent = 0
            with anyio.fail_after(WAIT_S):
                if limit == "buffer":
                    async with redis.pipeline(transaction=True) as pipe:  # one XREAD
                        for _ in range(50):
                            sent += 1
                            pipe.xadd(stream, {"e": encoded_event("s1", sent, sent)})
                        await pipe.execute()
                burst_at = time.monotonic()
                while not stalled.server_closed():
                    if limit == "send-timeout":
                        for _ in range(10):
                            sent += 1
                            await redis.xadd(stream, {"e": encoded_event("s1", sent, sent)})
                    await anyio.sleep(0.01)
            closed_after_s = time.monotonic() - burst_at
            if kind == "ws":
                await eventually(lambda: _no_sockets(stack.client))
            events, ending = await stalled.read_to_end()
        finally:
            stalled.close()
    # It got what was on its way before the cut-off, then the end: never everything.
    assert events < sent, (events, sent)
    if limit == "buffer":
        assert closed_after_s < 2, closed_after_s  # at once, not at a timeout
        # a client that reads again finds why it was cut off
        assert ending == (b"0\r\n\r\n" if kind == "sse" else 1013), ending
    else:
        assert events > 0
        assert kind == "sse" or ending is None  # no close frame: it would stall too


async def _no_sockets(client: httpx.AsyncClient) -> bool:
    return await ws_connections(client) == 0
