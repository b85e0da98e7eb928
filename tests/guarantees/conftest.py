"""Every guarantee runs twice: on a single Redis and on the throwaway Redis Cluster
(`redis_cluster_url`, skipped where no server binary is installed), through one
`settings` fixture parametrised over the topology; every fixture built on it
(`redis`, `schema`, `pool`, `stack`) follows."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from core.settings import Settings
from tests import services
from tests.conftest import fresh_settings


@pytest.fixture(params=["redis", pytest.param("cluster", marks=pytest.mark.cluster)])
def topology(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def settings(
    topology: str, request: pytest.FixtureRequest, redis_url: str, database_url: str
) -> AsyncIterator[Settings]:
    if topology == "cluster":
        yield fresh_settings(request.getfixturevalue("redis_cluster_url"), database_url)
        return  # the cluster is thrown away after the session
    settings = fresh_settings(redis_url, database_url)
    async with services.prefix_deleted(redis_url, settings.key_prefix):
        yield settings
