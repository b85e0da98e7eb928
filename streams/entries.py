"""Stream entries, and the events read out of an event stream.

Every reader of events reads an entry the same way: the envelope decoded, its
`position` filled in from the entry's shard and id (in the stream it is empty)
— `read_written` — and, for whoever uses its payload, brought to its event type's
current shape by the system's `Catalog` (`core/catalog.py`) — `read_event`: the
fan-out, process managers, `?wait=` answers. The projector reads events as
written, and each projection that decodes them brings them to the current shape
(`Projection.project`): the event archive keeps every event as it was written.
"""

from __future__ import annotations

import msgspec

from core.catalog import Catalog
from core.messages import Envelope, envelope_decoder
from streams.keys import Shard
from streams.positions import event_position

Entry = tuple[bytes, dict[bytes, bytes]]
"""An entry as redis-py returns it: its id and its fields."""


def positioned(envelope: Envelope, shard: Shard, entry_id: str) -> Envelope:
    """`envelope` with its position: `shard`'s event stream at `entry_id`."""
    return msgspec.structs.replace(envelope, position=event_position(shard, entry_id))


def read_written(shard: Shard, entry_id: str, raw: bytes) -> Envelope:
    """The event an entry of `shard`'s event stream holds (its `e` field), with its
    position, as it was written."""
    return positioned(envelope_decoder.decode(raw), shard, entry_id)


def read_event(shard: Shard, entry_id: str, raw: bytes, catalog: Catalog) -> Envelope:
    """The same, in its event type's current shape."""
    return catalog.current(read_written(shard, entry_id, raw))
