"""The engine failing and coming back, over real sockets: breaker, retries, recovery."""

from __future__ import annotations

import asyncio

from tests.fakes.ollama import FakeOllama, Reply
from tests.support import Client, make_settings, metric, running_service, tokens_of


async def error_code(client: Client, text: str) -> dict[str, object]:
    frames = await client.turn(text)
    assert frames[-1]["type"] == "error", frames
    error: dict[str, object] = frames[-1]["error"]
    return error


async def test_breaker_opens_fails_fast_and_recovers_without_restart(
    fake_ollama: FakeOllama,
) -> None:
    settings = make_settings(
        ollama_base_url=fake_ollama.url,
        llm_retry_attempts=2,
        circuit_breaker_failure_threshold=4,
        circuit_breaker_recovery_timeout=0.5,
    )
    async with running_service(settings) as service:
        client = await service.connect()
        await client.start()
        await fake_ollama.refuse()

        # 2 turns x 2 attempts = 4 consecutive failures: the breaker opens on the last one,
        # and the client still sees the engine's own error for those turns
        for _ in range(2):
            error = await error_code(client, "hello?")
            assert error["code"] == "upstream_unavailable" and error["recoverable"] is True
        health = await service.get("/health")
        assert health.status_code == 503
        assert health.json()["circuit_breaker"]["state"] == "open"
        metrics = (await service.get("/metrics", monitoring=True)).text
        assert metric(metrics, "llm_service_circuit_state") == 2

        await fake_ollama.accept()
        before = len(fake_ollama.chats)
        error = await error_code(client, "fast fail")
        assert error["code"] == "circuit_open"
        assert error["recoverable"] is True
        assert 0 < int(str(error["retry_after_ms"])) <= 500
        assert len(fake_ollama.chats) == before, "no upstream call while open"

        await asyncio.sleep(0.55)  # the recovery timeout itself is what is under test
        frames = await client.turn("back?")
        assert frames[-1]["type"] == "response_complete"
        assert len(fake_ollama.chats) == before + 1
        health = await service.get("/health")
        assert health.status_code == 200
        assert health.json()["circuit_breaker"]["state"] == "closed"
        metrics = (await service.get("/metrics", monitoring=True)).text
        assert metric(metrics, "llm_service_circuit_state") == 0
        assert metric(metrics, "llm_service_errors_total", 'code="circuit_open"') == 1
        await client.close()


async def test_flaky_upstream_is_retried_without_duplicating_tokens(
    fake_ollama: FakeOllama,
) -> None:
    settings = make_settings(ollama_base_url=fake_ollama.url)
    busy = Reply(
        status=503, error="server busy, please try again.  maximum pending requests exceeded"
    )
    for i in range(6):
        fake_ollama.script(busy, Reply(chunks=[f"answer{i}", " is", " whole"]))
    async with running_service(settings) as service:
        client = await service.connect()
        await client.start()
        for i in range(6):
            frames = await client.turn(f"question {i}")
            assert frames[-1]["type"] == "response_complete"
            assert tokens_of(frames) == [f"answer{i}", " is", " whole"]
        assert len(fake_ollama.chats) == 12
        history = await client.history()
        assert [m["content"] for m in history if m["role"] == "assistant"] == [
            f"answer{i} is whole" for i in range(6)
        ]
        metrics = (await service.get("/metrics", monitoring=True)).text
        assert metric(metrics, "llm_service_upstream_retries_total") == 6
        assert (
            metric(metrics, "llm_service_upstream_requests_total", 'outcome="upstream_unavailable"')
            == 6
        )
        assert (await service.get("/health")).json()["circuit_breaker"]["state"] == "closed"
        await client.close()


async def test_no_retry_after_a_token_was_sent_or_on_client_errors() -> None:
    async with FakeOllama() as fake:
        settings = make_settings(ollama_base_url=fake.url)
        fake.script(
            Reply(chunks=["a", "b", "c"], drop_after=2), Reply(status=400, error="invalid options")
        )
        async with running_service(settings) as service:
            client = await service.connect()
            await client.start()
            frames = await client.turn("one")
            assert tokens_of(frames) == ["a", "b"]
            assert frames[-1]["error"]["code"] == "upstream_error"
            assert len(fake.chats) == 1, "a stream that produced tokens is never retried"
            frames = await client.turn("two")
            assert frames[-1]["error"]["code"] == "upstream_error"
            assert len(fake.chats) == 2, "400 is not retried"
            fake.models.clear()
            frames = await client.turn("three")
            assert frames[-1]["error"]["code"] == "model_not_found"
            assert len(fake.chats) == 3, "404 is not retried"
            health = (await service.get("/health")).json()
            assert health["circuit_breaker"]["consecutive_failures"] == 1  # only the drop
            await client.close()


async def test_retries_stop_at_the_deadline(fake_ollama: FakeOllama) -> None:
    settings = make_settings(
        ollama_base_url=fake_ollama.url,
        llm_retry_attempts=10,
        llm_retry_backoff_s=0.2,
        llm_retry_max_backoff_s=0.2,
        llm_retry_deadline_s=0.3,
        circuit_breaker_failure_threshold=100,
    )
    fake_ollama.default_reply = Reply(status=502, error="bad gateway")
    async with running_service(settings) as service:
        client = await service.connect()
        await client.start()
        error = await error_code(client, "anyone?")
        assert error["code"] == "upstream_unavailable"
        assert 1 < len(fake_ollama.chats) < 10
        await client.close()
