"""What a web process holds while it runs (`request.app.state.web`): its settings,
the system it serves, its clients, the command bus, the fan-out, the limits and the
metrics. Made by the lifespan of `app.web.create_app`."""

from __future__ import annotations

from dataclasses import dataclass

from app.cors import Origins
from app.limits import Limits
from app.metrics import Metrics
from app.system import System
from core.settings import Settings
from projections.cache import QueryCache
from projections.db import Pool
from streams.bus import CommandBus
from streams.connection import Redis, Scripts
from streams.fanout import Fanout
from streams.keys import Keys


@dataclass
class WebProcess:
    settings: Settings
    system: System
    keys: Keys
    redis: Redis
    scripts: Scripts
    bus: CommandBus
    pool: Pool
    fanout: Fanout
    limits: Limits
    origins: Origins
    query_cache: QueryCache
    metrics: Metrics
