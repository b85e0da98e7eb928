"""Guarantee 11 over WebSocket, by property-based fuzzing (hypothesis) against a
real uvicorn with a worker and a projector, on real Redis and Postgres: any
sequence of frames (JSON of any shape, the four ops with fields of any type and
value, text that is not JSON, binary frames, frames over `EDDY_MAX_BODY_BYTES`,
deep nesting) gets exactly one answer per frame (an error frame, or `pong`,
`subscribed`, `unsubscribed`, `accepted`), and the socket stays open. Afterwards
the system still serves (`test_bad_input.still_serving`), which also finds a
command accepted here that crashed its handler or stopped a projection.

Not generated: text frames that are not UTF-8 and frames over 16 MiB, which the
WebSocket protocol layer closes with 1007 and 1009 before Eddy sees them
(`test_bad_input.test_protocol_violations_close_by_the_rfc_and_harm_no_one`), and
floods, which are closed with 1008 by design (another item's tests).

The stack runs in a thread of its own (an anyio blocking portal), one per module,
so the synchronous hypothesis tests can use it; the last test checks it after
the fuzzing (pytest keeps a module's tests in file order).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import hypothesis
import msgspec
import pytest
from anyio.from_thread import BlockingPortal
from hypothesis import HealthCheck, given
from hypothesis import strategies as st
from websockets.sync.client import ClientConnection, connect

from app.registry import SYSTEM
from core.settings import Settings
from tests.conftest import fresh_settings
from tests.faults.test_bad_input import serving_in_a_thread, still_serving
from tests.sockets import ws_url
from tests.stack import Stack

pytestmark = [
    pytest.mark.slow,
    # The stack runs in another thread of this process and uses `random` (backoff
    # jitter); hypothesis sees the global state move while it draws and blames the
    # strategies.
    pytest.mark.filterwarnings(
        "ignore:Do not use the `random` module inside strategies"
        ":hypothesis.errors.HypothesisDeprecationWarning"
    ),
]

WAIT_S = 10
MAX_FRAME = 16 * 1024
"""`EDDY_MAX_BODY_BYTES` here: frames over it get `too_large`, cheaply."""
ANSWERS = {"error", "pong", "subscribed", "unsubscribed", "accepted"}
"""What answers a frame; `result`, `event` and `reset` frames come when they come."""
LATER = {"result", "event", "reset"}
SETTINGS = hypothesis.settings(
    database=None, deadline=None, suppress_health_check=list(HealthCheck), print_blob=True
)


@dataclass
class Served:
    stack: Stack
    portal: BlockingPortal
    accepted: list[str] = field(default_factory=list)
    """Ids of the commands the fuzzing got accepted."""


@pytest.fixture(scope="module")
def served(redis_url: str, database_url: str) -> Iterator[Served]:
    settings: Settings = msgspec.structs.replace(
        fresh_settings(redis_url, database_url), max_body_bytes=MAX_FRAME
    )
    with serving_in_a_thread(settings) as (stack, portal):
        yield Served(stack, portal)


# -- frames ----------------------------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
TEXT = st.text(max_size=40)
CONTROL = st.text(st.sampled_from("\x00\x01\x1f\x7f\u2028\ufeffa/:"), min_size=1, max_size=4)
"""Characters some later step may choke on (NUL: Postgres), which must be taken or refused."""
CONTEXTS = ["chat_sessions", "traces", "tools", "runtime_config", "message_streams"]
TOPICS = st.one_of(
    st.sampled_from(["*", *CONTEXTS, "session/s1", "traces/t1", "nope", "", "session/"]),
    st.builds("{}/{}".format, st.sampled_from([*CONTEXTS, "session"]), TEXT),
    TEXT,
)
SINCE = st.one_of(
    st.from_regex(r"\A2~(chat_sessions|traces|nope)(\.[0-9a-z]{0,9}(_[0-9a-z]{1,3})?){0,3}\Z"),
    TEXT,
)
VALID = {
    "CreateChatSession": {"agent_id": "fuzz", "participants": []},
    "UpdateRuntimeConfig": {"module": "fuzz", "settings": {"k": 1}},
    "AppendTraceSpan": {
        "trace_id": "fuzz",
        "span_id": "s",
        "name": "n",
        "started_at": "2026-01-01T00:00:00Z",
    },
}
PAYLOADS = st.one_of(
    st.sampled_from(list(VALID.values())),
    st.builds(lambda p, k, v: {**p, k: v}, st.sampled_from(list(VALID.values())), TEXT, JSON),
    JSON,
)
OPS = st.sampled_from(["subscribe", "unsubscribe", "command", "ping"]) | TEXT | JSON


def field_or_junk(good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(good, good, JSON)


OBJECTS = st.fixed_dictionaries(
    {"op": OPS},
    optional={
        "ref": field_or_junk(TEXT),
        "topic": field_or_junk(TOPICS),
        "since": field_or_junk(SINCE),
        "type": field_or_junk(st.sampled_from(sorted(SYSTEM.catalog.commands)) | TEXT),
        "payload": PAYLOADS,
        "id": field_or_junk(st.text(max_size=140)),
        "extra": JSON,
    },
)
FRAMES: st.SearchStrategy[str | bytes] = st.one_of(
    OBJECTS.map(json.dumps),
    JSON.map(json.dumps),
    TEXT,
    st.binary(max_size=64),
    st.integers(1, 3000).map(lambda n: "[" * n + "]" * n),
    st.integers(MAX_FRAME - 100, MAX_FRAME + 100).map(
        lambda n: '{"op": "ping", "pad": "' + "x" * n + '"}'
    ),
)


def answers_to(
    ws: ClientConnection, frame: str | bytes, accepted: list[str]
) -> list[dict[str, Any]]:
    """Send `frame`, then a ping of our own; the frames that answered `frame`."""
    probe = f"probe-{uuid.uuid4().hex}"
    ws.send(frame)
    ws.send(json.dumps({"op": "ping", "ref": probe}))
    answered: list[dict[str, Any]] = []
    while True:
        reply = json.loads(ws.recv(timeout=WAIT_S))
        op = reply.get("op")
        if op == "pong" and reply.get("ref") == probe:
            return answered
        assert op in ANSWERS | LATER, reply
        if op == "accepted":
            accepted.append(reply["command_id"])
        if op == "error":
            assert reply["error"]["code"] and reply["error"]["message"], reply
        if op in ANSWERS:
            answered.append(reply)


@hypothesis.settings(SETTINGS, max_examples=120)
@given(frames=st.lists(FRAMES, min_size=1, max_size=6))
def test_every_frame_gets_one_answer_and_the_socket_stays_open(
    served: Served, frames: list[str | bytes]
) -> None:
    with connect(ws_url(served.stack), additional_headers=served.stack.auth()) as ws:
        for frame in frames:
            answered = answers_to(ws, frame, served.accepted)
            assert len(answered) == 1, (frame[:300], answered)


@hypothesis.settings(SETTINGS, max_examples=60)
@given(
    name=st.sampled_from(sorted(VALID)),
    command_id=st.text(max_size=140) | CONTROL,
    ref=st.none() | TEXT,
)
def test_any_command_id(served: Served, name: str, command_id: str, ref: str | None) -> None:
    """A valid command under any id: `accepted` or a `bad_request` error frame, and
    what is accepted must not harm the pipeline (checked at the end)."""
    frame = {"op": "command", "type": name, "payload": VALID[name], "id": command_id, "ref": ref}
    with connect(ws_url(served.stack), additional_headers=served.stack.auth()) as ws:
        (answer,) = answers_to(ws, json.dumps(frame), served.accepted)
        if answer["op"] == "error":
            assert answer["error"]["code"] in ("bad_request", "idempotency_key_reused"), answer
        else:
            assert answer["op"] == "accepted" and answer["command_id"] == command_id, answer


def test_after_fuzzing_the_system_still_works(served: Served) -> None:
    """Last in the module: after the fuzzing."""
    assert served.accepted, "the fuzzing got no command accepted: it reached no handler"
    served.portal.call(still_serving, served.stack, served.accepted)
