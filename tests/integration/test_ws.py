"""The WebSocket contract of API.md against a real server: subscriptions, commands
and their results, resuming, error frames, close codes, tenant isolation."""

from __future__ import annotations

import contextlib
import json
import socket

import anyio
import msgspec
from anyio.abc import SocketAttribute
from websockets.asyncio.client import connect
from websockets.client import ClientProtocol
from websockets.frames import Frame as WsFrame
from websockets.protocol import State
from websockets.uri import parse_uri

from core.settings import Settings
from streams.connection import Redis
from tests.feeds import event, keys_of
from tests.pipeline import Pipeline, eventually
from tests.sockets import Client, Frame, closed_with, opened, ws_url
from tests.stack import Stack, serving

WAIT_S = 10


def create(agent_id: str = "agent-1") -> Frame:
    return {"agent_id": agent_id, "participants": []}


async def test_ping_is_answered_with_its_ref(stack: Stack) -> None:
    async with opened(stack) as c:
        await c.send({"op": "ping", "ref": "p1"})
        assert await c.next() == {"op": "pong", "ref": "p1"}
        await c.send({"op": "ping"})
        assert await c.next() == {"op": "pong", "ref": None}


async def test_a_command_is_accepted_processed_and_its_event_delivered(stack: Stack) -> None:
    async with opened(stack) as c:
        subscribed = await c.ask({"op": "subscribe", "topic": "*"})
        assert subscribed["op"] == "subscribed" and subscribed["topic"] == "*"
        assert isinstance(subscribed["position"], str) and subscribed["position"]

        frame = {"op": "command", "type": "CreateChatSession", "id": "create-1"}
        accepted = await c.ask({**frame, "payload": create()})
        assert accepted["op"] == "accepted" and accepted["command_id"] == "create-1"
        session_id = accepted["session_id"]
        assert accepted["aggregate_id"] == session_id
        result = await c.expect("result")
        assert result["ref"] == accepted["ref"] and result["command_id"] == "create-1"
        assert result["status"] == "processed" and len(result["events"]) == 1
        delivered = await c.expect("event")
        assert delivered["topic"] == "*" and isinstance(delivered["position"], str)
        envelope = delivered["event"]
        assert envelope["type"] == "ChatSessionCreated" and envelope["id"] == result["events"][0]
        assert envelope["aggregate_id"] == session_id and envelope["position"] == result["position"]

        # The same id again is the same command: its outcome, never a second event.
        again = await c.command("CreateChatSession", create(), "create-1")
        assert again["status"] == "processed" and again["events"] == result["events"]
        await c.command("CloseChatSession", {"session_id": session_id})
        closed = await c.expect("event")
        assert closed["event"]["type"] == "ChatSessionClosed", c.skipped
        assert c.events() == []

    r = await stack.client.get("/v1/commands/create-1", headers=stack.auth())
    assert r.json()["status"] == "processed"


async def test_since_resumes_right_after_an_event_frame(stack: Stack) -> None:
    async with opened(stack) as a:
        await a.ask({"op": "subscribe", "topic": "chat_sessions"})
        seen = []
        for n in range(3):
            result = await a.command("CreateChatSession", create(), f"c{n}")
            seen.append(
                await a.expect("event", lambda f, r=result: f["event"]["id"] in r["events"])
            )
        assert a.events() == []

    async with opened(stack) as b:
        subscribed = await b.ask(
            {"op": "subscribe", "topic": "chat_sessions", "since": seen[0]["position"]}
        )
        assert subscribed["op"] == "subscribed"
        resumed = [await b.expect("event"), await b.expect("event")]
        assert [f["event"]["id"] for f in resumed] == [f["event"]["id"] for f in seen[1:]]
        assert [f["position"] for f in resumed] == [f["position"] for f in seen[1:]]
        result = await b.command("CreateChatSession", create(), "c3")
        later = await b.expect("event")
        assert later["event"]["id"] == result["events"][0]
        await b.pong()
        assert b.events() == []  # no duplicate, nothing else


async def test_since_takes_an_events_own_position_on_an_aggregates_topic(stack: Stack) -> None:
    """A client that keeps only envelopes (API.md's `event` frame) resumes an
    aggregate's topic from the last envelope's `position`: no gap, no duplicate."""
    async with opened(stack) as a:
        created = await a.command("CreateChatSession", create(), "agg-0")
        session_id = created["aggregate_id"]
        topic = f"chat_sessions/{session_id}"
        await a.ask({"op": "subscribe", "topic": topic})
        updates = [
            await a.command(
                "UpdateChatSessionParticipants",
                {"session_id": session_id, "add": [{"participant_id": f"p{n}", "role": "user"}]},
            )
            for n in range(3)
        ]
        seen = [
            await a.expect("event", lambda f, r=result: f["event"]["id"] in r["events"])
            for result in updates
        ]

    async with opened(stack) as b:
        since = seen[0]["event"]["position"]  # the envelope's own, not the frame's token
        assert not since.startswith("2~")
        subscribed = await b.ask({"op": "subscribe", "topic": topic, "since": since})
        assert subscribed["op"] == "subscribed", subscribed
        resumed = [await b.expect("event"), await b.expect("event")]
        assert [f["event"]["id"] for f in resumed] == [f["event"]["id"] for f in seen[1:]]
        closed = await b.command("CloseChatSession", {"session_id": session_id})
        later = await b.expect("event")
        assert later["event"]["id"] == closed["events"][0]
        await b.pong()
        assert b.events() == []  # no duplicate, nothing else

        # Where the position cannot say how far the other streams were: refused.
        for ambiguous in ("chat_sessions", f"session/{session_id}", "*"):
            refused = await b.ask({"op": "subscribe", "topic": ambiguous, "since": since})
            assert refused["op"] == "error", refused
            assert refused["error"]["code"] == "bad_position"
            assert "feed token" in refused["error"]["message"]
        # and a position on another shard is not one of this aggregate's
        await b.ask({"op": "unsubscribe", "topic": topic})
        other = since.replace("chat_sessions.0.", "chat_sessions.1.", 1)
        if other == since:
            other = since.replace("chat_sessions.1.", "chat_sessions.0.", 1)
        refused = await b.ask({"op": "subscribe", "topic": topic, "since": other, "ref": "x"})
        assert refused["error"]["code"] == "bad_position"


async def test_unsubscribe_stops_delivery(stack: Stack) -> None:
    async with opened(stack) as c:
        await c.ask({"op": "subscribe", "topic": "chat_sessions"})
        await c.ask({"op": "subscribe", "topic": "*"})
        answer = await c.ask({"op": "unsubscribe", "topic": "chat_sessions"})
        assert answer == {"op": "unsubscribed", "ref": answer["ref"], "topic": "chat_sessions"}
        for n in range(2):
            result = await c.command("CreateChatSession", create(), f"u{n}")
            got = await c.expect("event", lambda f, r=result: f["event"]["id"] in r["events"])
            assert got["topic"] == "*"
        await c.pong()
        assert c.events() == []
        # ...and the topic can be subscribed to again
        assert (await c.ask({"op": "subscribe", "topic": "chat_sessions"}))["op"] == "subscribed"


async def test_bad_frames_get_error_frames_and_the_socket_stays_open(
    settings: Settings, schema: str
) -> None:
    settings = msgspec.structs.replace(settings, max_body_bytes=4096, ws_max_subscriptions=2)
    valid = create()
    cases: list[tuple[str | bytes | Frame, str]] = [
        ("not json", "malformed"),
        ("[1, 2]", "malformed"),
        (b'{"op": "ping"}', "malformed"),  # a binary frame
        ('{"op": "ping", "pad": "' + "x" * 5000 + '"}', "too_large"),
        ({"op": "nope"}, "invalid"),
        ({"ref": "r"}, "invalid"),
        ({"op": "subscribe", "topic": 5}, "invalid"),
        ({"op": "subscribe"}, "invalid"),
        ({"op": "subscribe", "topic": "nope"}, "bad_request"),
        ({"op": "subscribe", "topic": "*", "since": "!!!"}, "bad_position"),
        ({"op": "unsubscribe", "topic": "traces"}, "not_subscribed"),
        ({"op": "command", "type": "Nope", "payload": {}}, "unknown_command"),
        ({"op": "command", "type": "CreateChatSession", "payload": [1]}, "malformed"),
        ({"op": "command", "type": "CreateChatSession", "payload": {"agent_id": 1}}, "invalid"),
        ({"op": "command", "type": "CreateChatSession", "payload": valid, "id": ""}, "bad_request"),
    ]
    async with serving(settings) as stack, opened(stack) as c:
        for n, (case, code) in enumerate(cases):
            ref = f"r{n}" if isinstance(case, dict) else None
            frame = json.dumps({**case, "ref": ref}) if isinstance(case, dict) else case
            await c.ws.send(frame)
            answer = await c.next()
            assert answer["op"] == "error" and answer["error"]["code"] == code, (frame, answer)
            assert answer.get("ref") == ref and answer["error"]["message"], (frame, answer)
            if code == "invalid":
                assert answer["error"]["fields"][0]["path"].startswith("$"), answer
            await c.pong()
        missing = await c.ask({"op": "command", "type": "CreateChatSession"})
        assert missing["error"]["fields"][0]["path"] == "$.payload", missing

        assert (await c.ask({"op": "subscribe", "topic": "*"}))["op"] == "subscribed"
        again = await c.ask({"op": "subscribe", "topic": "*"})
        assert again["error"]["code"] == "already_subscribed"
        assert (await c.ask({"op": "subscribe", "topic": "traces"}))["op"] == "subscribed"
        third = await c.ask({"op": "subscribe", "topic": "tools"})
        assert third["error"]["code"] == "too_many_subscriptions"
        await c.pong()

        async with opened(stack, roles=("observer",)) as observer:
            refused = await observer.ask(
                {"op": "command", "type": "CreateChatSession", "payload": valid}
            )
            assert refused["op"] == "error" and refused["error"]["code"] == "forbidden"
            await observer.pong()


async def test_a_socket_without_a_valid_token_is_closed_with_1008(stack: Stack) -> None:
    async with connect(ws_url(stack)) as ws:
        code, reason, _ = await closed_with(ws)
        assert code == 1008 and "token" in reason
    async with connect(ws_url(stack, "?access_token=not-a-token")) as ws:
        code, reason, _ = await closed_with(ws)
        assert code == 1008 and "bad token" in reason
    async with connect(ws_url(stack, f"?access_token={stack.token()}")) as ws:
        await Client(ws).pong()


async def test_a_flooding_client_is_closed_with_1008(settings: Settings, schema: str) -> None:
    settings = msgspec.structs.replace(settings, ws_frames_per_s=1.0, ws_burst=5)
    async with serving(settings, projector=False) as stack, opened(stack) as c:
        for _ in range(50):
            await c.send({"op": "ping"})
        code, reason, pongs = await closed_with(c.ws)
        assert code == 1008 and "too many frames" in reason
        assert 5 <= pongs < 50


async def test_a_burst_of_500_chunks_is_accepted_in_order(stack: Stack) -> None:
    async with opened(stack) as c:
        created = await c.command("CreateChatSession", {**create(), "session_id": "s1"})
        assert created["status"] == "processed", created
        payload = {"session_id": "s1", "participant_id": "u1", "stream_id": "m1"}
        started = await c.command("StartMessageStream", payload)
        assert started["status"] == "processed", started
        for seq in range(1, 501):
            payload = {"stream_id": "m1", "seq": seq, "chunk": f"{seq} "}
            await c.send({"op": "command", "type": "PushStreamMessage", "payload": payload})
        accepted: list[str] = []
        results: list[Frame] = []
        with anyio.fail_after(30):
            while len(results) < 500:
                frame = await c.next()
                assert frame["op"] in ("accepted", "result"), frame
                (accepted if frame["op"] == "accepted" else results).append(frame)
        assert len(accepted) == 500
        assert {r["command_id"] for r in results} == {a["command_id"] for a in accepted}
        # A chunk applied out of order would leave a gap, which is rejected.
        assert [r for r in results if r["status"] != "processed"] == []
        await c.pong()


async def test_a_lagging_subscriber_is_closed_with_1013(
    settings: Settings, schema: str, redis: Redis
) -> None:
    settings = msgspec.structs.replace(settings, subscriber_buffer=2)
    keys = keys_of(settings)
    async with serving(settings, worker=False, projector=False) as stack, opened(stack) as c:
        assert (await c.ask({"op": "subscribe", "topic": "*"}))["op"] == "subscribed"
        shard = keys.shard_of("chat_sessions", "tenant-a", "s1")
        async with redis.pipeline(transaction=True) as pipe:
            for version in range(1, 51):
                envelope = event("tenant-a", "chat_sessions", "s1", version)
                pipe.xadd(keys.event_stream(shard), {"e": msgspec.json.encode(envelope)})
            await pipe.execute()
        code, reason, _ = await closed_with(c.ws)
        assert code == 1013 and "since" in reason


async def test_a_rejected_command_has_a_failed_result(stack: Stack) -> None:
    async with opened(stack) as c:
        result = await c.command("CloseChatSession", {"session_id": "no-such-session"})
        assert result["status"] == "failed" and result["error"]["code"] == "not_found", result
        assert "events" not in result


async def test_a_socket_sees_only_its_tenants_events(stack: Stack) -> None:
    async with opened(stack, "tenant-a") as a, opened(stack, "tenant-b") as b:
        await a.ask({"op": "subscribe", "topic": "*"})
        await b.ask({"op": "subscribe", "topic": "*"})
        for n in range(3):
            result = await a.command("CreateChatSession", create(), f"a{n}")
            await a.expect("event", lambda f, r=result: f["event"]["id"] in r["events"])
        # Same command ids in another tenant are other commands.
        result = await b.command("CreateChatSession", create(), "a0")
        own = await b.expect("event")
        assert own["event"]["id"] == result["events"][0]
        assert own["event"]["tenant_id"] == "tenant-b"
        await b.pong()
        assert b.events() == []


async def test_pending_commands_are_bounded(settings: Settings, schema: str) -> None:
    settings = msgspec.structs.replace(settings, ws_max_pending=2)
    async with serving(settings, worker=False, projector=False) as stack, opened(stack) as c:
        for _ in range(2):
            answer = await c.ask(
                {"op": "command", "type": "CreateChatSession", "payload": create()}
            )
            assert answer["op"] == "accepted", answer
        refused = await c.ask({"op": "command", "type": "CreateChatSession", "payload": create()})
        assert refused["op"] == "error" and refused["error"]["code"] == "too_many_pending"
        await c.pong()


async def test_redis_down_refuses_a_command_with_unavailable(
    settings: Settings, schema: str
) -> None:
    nothing_listens = "redis://127.0.0.1:1/0"
    settings = msgspec.structs.replace(settings, redis_url=nothing_listens)
    async with serving(settings, worker=False, projector=False) as stack, opened(stack) as c:
        refused = await c.ask(
            {"op": "command", "type": "CreateChatSession", "id": "k1", "payload": create()}
        )
        assert refused["op"] == "error" and refused["error"]["code"] == "unavailable", refused
        await c.pong()


async def test_a_stopping_server_closes_its_sockets(settings: Settings, schema: str) -> None:
    async with serving(settings, worker=False, projector=False) as stack:
        ws = await connect(ws_url(stack), additional_headers=stack.auth())
        c = Client(ws)
        assert (await c.ask({"op": "subscribe", "topic": "*"}))["op"] == "subscribed"
    code, _, _ = await closed_with(ws)
    assert code == 1012  # service restart: reconnect, and resume with since


async def test_a_client_that_stops_reading_is_cut_off_after_the_send_timeout(
    settings: Settings, schema: str, redis: Redis
) -> None:
    settings = msgspec.structs.replace(settings, send_timeout_s=0.5, subscriber_buffer=10_000)
    keys = keys_of(settings)
    pad = b'{"pad":"' + b"x" * 65_000 + b'"}'
    async with serving(settings, worker=False, projector=False) as stack:
        # A sans-I/O client over a small receive buffer: unlike a `websockets`
        # connection, it reads nothing unless told to.
        protocol = ClientProtocol(parse_uri(ws_url(stack)))
        request = protocol.connect()
        request.headers["Authorization"] = stack.auth()["Authorization"]
        protocol.send_request(request)
        port = int(stack.url.rsplit(":", 1)[1])
        async with await anyio.connect_tcp("127.0.0.1", port) as tcp:
            tcp.extra(SocketAttribute.raw_socket).setsockopt(
                socket.SOL_SOCKET, socket.SO_RCVBUF, 16_384
            )
            await tcp.send(b"".join(protocol.data_to_send()))
            with anyio.fail_after(WAIT_S):
                while protocol.state is not State.OPEN:
                    protocol.receive_data(await tcp.receive())
                protocol.send_text(b'{"op": "subscribe", "topic": "*"}')
                await tcp.send(b"".join(protocol.data_to_send()))
                while not any(isinstance(e, WsFrame) for e in protocol.events_received()):
                    protocol.receive_data(await tcp.receive())

            shard = keys.shard_of("chat_sessions", "tenant-a", "s1")
            async with redis.pipeline(transaction=False) as pipe:
                for version in range(1, 201):  # 13 MB: more than every buffer on the way
                    envelope = event("tenant-a", "chat_sessions", "s1", version, payload=pad)
                    pipe.xadd(keys.event_stream(shard), {"e": msgspec.json.encode(envelope)})
                await pipe.execute()

            async def cut_off() -> bool:
                metrics = (await stack.client.get("/metrics")).text
                return "eddy_ws_connections 0.0" in metrics

            await eventually(cut_off)
            frames = 0
            with anyio.fail_after(WAIT_S):  # what was sent before, then the end, no close frame
                with contextlib.suppress(anyio.EndOfStream):
                    while True:
                        protocol.receive_data(await tcp.receive())
                        frames += sum(isinstance(e, WsFrame) for e in protocol.events_received())
            protocol.receive_eof()
            assert protocol.close_rcvd is None and 0 < frames < 200


async def test_bus_statuses_equal_status_one_by_one(settings: Settings, redis: Redis) -> None:
    p = Pipeline(settings, redis)
    ids = ["s-0", "s-1", "s-2"]
    for command_id in ids:
        await p.submit("CreateChatSession", create(), command_id=command_id)
    asked = ["s-2", "unknown", "s-0", "s-1"]
    one_by_one = [await p.bus.status("tenant-a", command_id) for command_id in asked]
    assert await p.bus.statuses("tenant-a", asked) == one_by_one
    assert [s.status if s else None for s in one_by_one] == ["pending", None, "pending", "pending"]
    assert await p.bus.statuses("tenant-b", ids) == [None, None, None]
    assert await p.bus.statuses("tenant-a", []) == []
