"""Key names, shards and position tokens: pure."""

from __future__ import annotations

import string

import pytest
from redis.crc import key_slot

from app.registry import SYSTEM
from core.errors import BadPosition
from streams.keys import Keys, Shard
from streams.positions import (
    decode_cursor,
    encode_cursor,
    event_position,
    parse_entry_id,
    parse_event_position,
)

KEYS = Keys("eddy", 4)


def test_every_key_of_one_shard_is_in_one_cluster_slot() -> None:
    shard = KEYS.shard_of("chat_sessions", "tenant", "session-1")
    names = [
        KEYS.command_stream(shard),
        KEYS.event_stream(shard),
        KEYS.aggregate(shard, "tenant", "session-1"),
        KEYS.command_status(shard, "tenant", "cmd-1"),
        KEYS.lease(shard, "worker"),
    ]
    assert len({key_slot(name.encode()) for name in names}) == 1


def test_shards_are_stable_and_spread() -> None:
    shards = [KEYS.shard_of("chat_sessions", "t", f"s{i}").number for i in range(400)]
    assert shards == [KEYS.shard_of("chat_sessions", "t", f"s{i}").number for i in range(400)]
    assert all(60 < shards.count(n) < 140 for n in range(4))


def test_ids_with_separators_cannot_collide() -> None:
    shard = Shard("chat_sessions", 0)
    assert KEYS.aggregate(shard, "a:b", "c") != KEYS.aggregate(shard, "a", "b:c")


def test_event_positions_round_trip_and_reject_foreign_tokens() -> None:
    shard = Shard("chat_sessions", 3)
    token = event_position(shard, "1700000000000-5")
    assert parse_event_position(token, SYSTEM.catalog.by_name, 4) == (shard, (1700000000000, 5))
    for bad in ("garbage", "chat_sessions.9.1-0", "nope.1.1-0", "chat_sessions.1.x-y"):
        with pytest.raises(BadPosition):
            parse_event_position(bad, SYSTEM.catalog.by_name, 4)


def test_cursors_round_trip() -> None:
    cursor = {Shard("chat_sessions", 0): (5, 1), Shard("chat_sessions", 1): (0, 0)}
    assert decode_cursor(encode_cursor(cursor), SYSTEM.catalog.by_name, 4) == cursor
    sparse = {Shard("chat_sessions", 3): (1795618196695, 36)}
    assert decode_cursor(encode_cursor(sparse), SYSTEM.catalog.by_name, 4) == sparse
    assert parse_entry_id("12-3") < parse_entry_id("12-10") < parse_entry_id("13-0")


def test_feed_tokens_are_compact_and_need_no_escaping() -> None:
    cursor = {Shard("chat_sessions", n): (1795618196695 + n, n) for n in range(4)}
    token = encode_cursor(cursor)
    assert token == "2~chat_sessions.mww8pntj.mww8pntk_1.mww8pntl_2.mww8pntm_3"
    unreserved = set(string.ascii_letters + string.digits + "-._~")
    assert set(token) <= unreserved


@pytest.mark.parametrize(
    "token",
    [
        "",
        "!!!",
        "2",
        "1~chat_sessions.1",  # another format version
        "Y2hhdF9zZXNzaW9ucy4wLjEtMA",  # base64, as tokens never were
        "2~nope.1",
        "2~chat_sessions.1.1.1.1.1",  # more shards than there are
        "2~chat_sessions.1-0",
        "2~chat_sessions.-1",
        "2~chat_sessions...",
    ],
)
def test_foreign_feed_tokens_are_refused(token: str) -> None:
    with pytest.raises(BadPosition):
        decode_cursor(token, SYSTEM.catalog.by_name, 4)
