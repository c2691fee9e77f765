"""Fixtures: the fake Ollama, the real service in front of it on ephemeral ports, an
OTLP/HTTP traces endpoint and a redis-server; and, for every test, a check that no task's
exception went unseen."""

from __future__ import annotations

import asyncio
import gc
import json
import math
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.ollama import FakeOllama
from tests.fakes.otlp import Collector, running_collector
from tests.redis_server import RedisServer
from tests.support import RunningService, make_settings, running_service


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under mutation testing (scripts/mutation.sh), run a mutant's tests fastest first, by
    the durations mutmut measured in its clean run: the first failure ends the run (-x), so a
    caught mutant costs as few seconds as it can. The order changes no test's outcome."""
    if "MUTANT_UNDER_TEST" not in os.environ:
        return
    try:
        durations = json.loads(Path("mutmut-stats.json").read_text())["duration_by_test"]
    except (OSError, ValueError, KeyError):
        return
    items.sort(key=lambda item: durations.get(item.nodeid, math.inf))


@pytest.fixture(autouse=True)
async def no_exception_goes_unseen() -> AsyncIterator[None]:
    """Fail a test whose loop reported an error nobody handled: a task that raised and was
    never awaited ("Task exception was never retrieved"), a callback that raised. Such an
    exception changes no frame, so no other assertion would see it."""
    loop = asyncio.get_running_loop()
    unseen: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: unseen.append(context))
    yield
    gc.collect()  # a finished task reports its unretrieved exception when it is freed
    loop.set_exception_handler(None)
    assert not unseen, [
        f"{context.get('message')}: {context.get('exception')!r}" for context in unseen
    ]


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
