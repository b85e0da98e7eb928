"""Reading Server-Sent Events: the one parser of the tests and of the bench.

Frames are read out of the raw bytes of a response as they arrive (`Parser`), so
a reader timing thousands of events a second is not held up by its own parsing.
Per the SSE format: a frame ends at a blank line; `id`, `event` and `data` fields
(one space after the colon dropped; several `data` lines joined by newlines); a
line starting with `:` is a comment (a frame of its own here, so keep-alives are
seen); a line may end in `\\r\\n`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import msgspec

from core.messages import Envelope


@dataclass
class Frame:
    id: str | None = None
    event: str | None = None
    data: str | None = None
    comment: str | None = None

    @property
    def envelope(self) -> Envelope:
        assert self.data is not None
        return msgspec.json.decode(self.data, type=Envelope)


class Parser:
    """Frames out of a stream of bytes, fed chunk by chunk."""

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, chunk: bytes) -> list[Frame]:
        """The frames `chunk` completes (a frame split across chunks waits for its end)."""
        self._pending += chunk.replace(b"\r\n", b"\n")
        *complete, self._pending = self._pending.split(b"\n\n")
        found: list[Frame] = []
        for block in complete:
            frame = Frame()
            for raw in block.decode().split("\n"):
                if raw.startswith(":"):
                    found.append(Frame(comment=raw[1:].strip()))
                    continue
                name, _, value = raw.partition(":")
                value = value.removeprefix(" ")
                if name == "data":
                    frame.data = value if frame.data is None else f"{frame.data}\n{value}"
                elif name in ("id", "event"):
                    setattr(frame, name, value)
            if frame != Frame():
                found.append(frame)
        return found


async def frames(response: httpx.Response) -> AsyncIterator[Frame]:
    """The frames of an SSE response, as they arrive."""
    parser = Parser()
    async for chunk in response.aiter_raw():
        for frame in parser.feed(chunk):
            yield frame
