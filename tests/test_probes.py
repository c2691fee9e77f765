"""Kubernetes-style probes: `/livez` (the process answers) and `/readyz` (a new session here
would be served), on both ports."""

from __future__ import annotations

import asyncio

from tests.fakes.ollama import FakeOllama, Reply
from tests.support import RunningService, make_settings, poll, running_service


async def probes(service: RunningService) -> list[tuple[int, dict[str, object]]]:
    found = []
    for monitoring in (False, True):
        for path in ("/livez", "/readyz"):
            response = await service.get(path, monitoring=monitoring)
            found.append((response.status_code, response.json()))
    return found


async def test_ready_and_alive_with_a_healthy_engine(service: RunningService) -> None:
    alive, ready = (200, {"status": "alive"}), (200, {"status": "ready"})
    assert await probes(service) == [alive, ready, alive, ready]


async def test_not_ready_but_alive_while_the_engine_is_down(fake_ollama: FakeOllama) -> None:
    async with running_service(make_settings(ollama_base_url=fake_ollama.url)) as service:
        await fake_ollama.refuse()
        for monitoring in (False, True):
            assert (await service.get("/livez", monitoring=monitoring)).status_code == 200
            response = await service.get("/readyz", monitoring=monitoring)
            assert response.status_code == 503
            body = response.json()
            assert body["status"] == "not_ready"
            assert [r.split(":")[0] for r in body["reasons"]] == ["engine unreachable"]
        await fake_ollama.accept()
        assert (await service.get("/readyz")).json() == {"status": "ready"}


async def test_not_ready_without_the_model() -> None:
    async with (
        FakeOllama(models=("some-other:1b",)) as fake,
        running_service(make_settings(ollama_base_url=fake.url)) as service,
    ):
        response = await service.get("/readyz")
        assert response.status_code == 503
        assert response.json()["reasons"] == ["model 'llama3.2:1b' is not on the engine"]


async def test_not_ready_while_every_circuit_is_open(fake_ollama: FakeOllama) -> None:
    settings = make_settings(
        ollama_base_url=fake_ollama.url,
        circuit_breaker_failure_threshold=1,
        circuit_breaker_recovery_timeout=60,
        llm_retry_attempts=1,
    )
    fake_ollama.script(Reply(status=500, error="runner died"))
    async with running_service(settings) as service:
        client = await service.connect()
        await client.start()
        await client.send({"type": "user_message", "text": "Hi"})
        assert (await client.recv_until("error"))[-1]["error"]["code"] == "upstream_error"
        response = await service.get("/readyz")
        assert response.status_code == 503
        assert response.json()["reasons"] == ["every upstream's circuit breaker is open"]
        assert (await service.get("/livez")).status_code == 200
        await client.close()


async def test_not_ready_while_draining_on_the_monitoring_port(fake_ollama: FakeOllama) -> None:
    # The main port stops listening when the drain starts; the monitoring port answers on,
    # so a readiness probe there sees the drain and takes the replica out of rotation.
    fake_ollama.script(Reply(chunks=["word "] * 2000, delay=0.01))
    settings = make_settings(ollama_base_url=fake_ollama.url, llm_shutdown_grace_s=30)
    async with running_service(settings) as service:
        client = await service.connect()
        await client.start()
        await client.send({"type": "user_message", "text": "Talk."})
        assert (await client.recv())["type"] == "token"
        assert (await service.get("/readyz", monitoring=True)).status_code == 200
        shutdown = asyncio.create_task(service.runner.shutdown())

        async def draining() -> bool:
            response = await service.get("/readyz", monitoring=True)
            return response.status_code == 503

        await poll(draining, limit=10)
        body = (await service.get("/readyz", monitoring=True)).json()
        assert body["reasons"] == ["draining: the service is shutting down"]
        assert (await service.get("/livez", monitoring=True)).json() == {"status": "alive"}
        await client.close()  # the last session goes: the drain ends
        await asyncio.wait_for(shutdown, 30)
