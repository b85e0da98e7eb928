"""A WebSocket client for tests: frames as dicts, answers found by `ref`."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.stack import Stack

WAIT_S = 10
Frame = dict[str, Any]


def ws_url(stack: Stack, query: str = "") -> str:
    return stack.url.replace("http://", "ws://", 1) + "/v1/ws" + query


class Client:
    """A WebSocket client that keeps the frames it read past while looking for one."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.skipped: list[Frame] = []

    async def send(self, frame: Frame) -> None:
        await self.ws.send(json.dumps(frame))

    async def next(self) -> Frame:
        with anyio.fail_after(WAIT_S):
            frame: Frame = json.loads(await self.ws.recv())
        return frame

    async def expect(self, op: str, where: Callable[[Frame], bool] = lambda f: True) -> Frame:
        """The first frame (skipped earlier, or read now) with `op` that passes `where`."""
        for i, frame in enumerate(self.skipped):
            if frame["op"] == op and where(frame):
                return self.skipped.pop(i)
        while True:
            frame = await self.next()
            if frame["op"] == op and where(frame):
                return frame
            self.skipped.append(frame)

    async def ask(self, frame: Frame) -> Frame:
        """Send `frame` with a fresh ref; the first answer carrying that ref."""
        ref = uuid.uuid4().hex
        await self.send({**frame, "ref": ref})
        while True:
            answer = await self.next()
            if answer.get("ref") == ref and answer["op"] != "result":
                return answer
            self.skipped.append(answer)

    async def command(self, type_name: str, payload: Frame, command_id: str | None = None) -> Frame:
        """Submit a command; its `result` frame."""
        frame: Frame = {"op": "command", "type": type_name, "payload": payload}
        if command_id is not None:
            frame["id"] = command_id
        accepted = await self.ask(frame)
        assert accepted["op"] == "accepted", accepted
        return await self.expect("result", lambda f: f["command_id"] == accepted["command_id"])

    async def pong(self) -> None:
        """The socket is open and answering."""
        assert (await self.ask({"op": "ping"}))["op"] == "pong"

    def events(self) -> list[Frame]:
        return [f for f in self.skipped if f["op"] == "event"]


@asynccontextmanager
async def opened(
    stack: Stack, tenant: str = "tenant-a", roles: tuple[str, ...] = ("admin",)
) -> AsyncIterator[Client]:
    async with connect(ws_url(stack), additional_headers=stack.auth(tenant, roles)) as ws:
        yield Client(ws)


async def closed_with(ws: ClientConnection) -> tuple[int, str, int]:
    """Read until the server closes: its close code and reason, and the frames read."""
    read = 0
    with anyio.fail_after(WAIT_S):
        try:
            while True:
                await ws.recv()
                read += 1
        except ConnectionClosed as exc:
            assert exc.rcvd is not None, exc
            return exc.rcvd.code, exc.rcvd.reason, read
