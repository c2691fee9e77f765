"""Fixtures: the fake Ollama, the real service in front of it on ephemeral ports, an
OTLP/HTTP traces endpoint and a redis-server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.fakes.ollama import FakeOllama
from tests.fakes.otlp import Collector, running_collector
from tests.redis_server import RedisServer
from tests.support import RunningService, make_settings, running_service


@pytest.fixture
async def fake_ollama() -> AsyncIterator[FakeOllama]:
    async with FakeOllama() as fake:
        yield fake


@pytest.fixture
async def service(fake_ollama: FakeOllama) -> AsyncIterator[RunningService]:
    async with running_service(make_settings(ollama_base_url=fake_ollama.url)) as running:
        yield running


@pytest.fixture
async def collector() -> AsyncIterator[Collector]:
    async with running_collector() as found:
        yield found


@pytest.fixture
async def redis_server(tmp_path: Path) -> AsyncIterator[RedisServer]:
    workdir = tmp_path / "redis"
    workdir.mkdir()
    server = RedisServer(workdir)
    await server.start()
    try:
        yield server
    finally:
        await server.kill()
