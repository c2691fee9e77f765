"""Fixtures: the fake Ollama, the real service in front of it on ephemeral ports, and an
OTLP/HTTP traces endpoint."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.fakes.ollama import FakeOllama
from tests.fakes.otlp import Collector, running_collector
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
