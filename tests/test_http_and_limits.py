"""/health, /stats, /metrics and the connection limit, over real sockets."""

from __future__ import annotations

import asyncio

from tests.fakes.ollama import FakeOllama, Reply, fake_tokens
from tests.support import RunningService, make_settings, metric, poll, running_service, tokens_of


async def test_max_connections_is_enforced_and_released(fake_ollama: FakeOllama) -> None:
    settings = make_settings(ollama_base_url=fake_ollama.url, llm_max_connections=2)
    async with running_service(settings) as service:
        first, second = await service.connect(), await service.connect()
        await first.start()
        await second.start()
        third = await service.connect()
        frame = await third.recv()
        assert frame["type"] == "error"
        assert frame["error"]["code"] == "max_connections"
        assert frame["error"]["recoverable"] is False
        await asyncio.wait_for(third.ws.wait_closed(), 2)
        assert third.ws.close_code == 1013
        health = (await service.get("/health")).json()
        assert health["active_connections"] == 2

        await first.close()

        async def one_left() -> bool:
            return bool((await service.get("/health")).json()["active_connections"] == 1)

        await poll(one_left)
        fourth = await service.connect()
        await fourth.start()
        frames = await fourth.turn("room now?")
        assert frames[-1]["type"] == "response_complete"
        metrics = (await service.get("/metrics", monitoring=True)).text
        assert (
            metric(metrics, "llm_service_connections_rejected_total", 'reason="max_connections"')
            == 1
        )
        await second.close()
        await fourth.close()


async def test_health_stats_and_metrics_report_what_happened(
    service: RunningService, fake_ollama: FakeOllama
) -> None:
    health = await service.get("/health")
    assert health.status_code == 200
    body = health.json()
    assert body["status"] == "healthy"
    assert body["model"] == "llama3.2:1b"
    assert body["ollama_connection"] is True
    assert body["backend"] == "ollama"
    assert body["engine"]["version"] == fake_ollama.version
    assert (body["active_connections"], body["active_sessions"]) == (0, 0)

    fake_ollama.script(
        Reply(chunks=["a", "b", "c"]),
        Reply(chunks=["d", "e"]),
        Reply(status=500, error="boom"),
        Reply(chunks=["x"] * 100, delay=0.01),
    )
    client = await service.connect()
    await client.start()
    await client.turn("one")
    await client.turn("two")
    await client.turn("three")
    await client.send("garbage")
    await client.recv()
    await client.send({"type": "user_message", "text": "long"})
    await client.recv()
    await client.send({"type": "cancel"})
    cancelled_frames = (await client.recv_until("cancelled"))[-1]["stats"]["token_frames"]

    during = (await service.get("/health")).json()
    assert (during["active_connections"], during["active_sessions"]) == (1, 1)
    stats = (await service.get("/stats")).json()
    generated = fake_tokens("abc") + fake_tokens("de")
    assert stats["connections"]["active_connections"] == 1
    assert stats["connections"]["total_connections"] == 1
    assert stats["conversations"]["active_sessions"] == 1
    assert stats["conversations"]["total_turns"] == 4
    cancelled_tokens = stats["conversations"]["total_tokens_generated"] - generated
    assert cancelled_tokens >= 1
    assert stats["connections"]["total_tokens_generated"] == generated + cancelled_tokens
    assert stats["errors"]["total_errors"] == 2
    assert stats["errors"]["by_category"] == {"upstream_error": 1, "invalid_json": 1}

    text = (await service.get("/metrics", monitoring=True)).text
    assert metric(text, "llm_service_connections_active") == 1
    assert metric(text, "llm_service_connections_max") == 50  # LLM_MAX_CONNECTIONS
    assert metric(text, "llm_service_connections_total") == 1
    assert metric(text, "llm_service_sessions_active") == 1
    assert metric(text, "llm_service_turns_total", 'outcome="completed"') == 2
    assert metric(text, "llm_service_turns_total", 'outcome="failed"') == 1
    assert metric(text, "llm_service_turns_total", 'outcome="cancelled"') == 1
    assert metric(text, "llm_service_tokens_generated_total") == generated + cancelled_tokens
    assert metric(text, "llm_service_errors_total", 'code="upstream_error"') == 1
    assert metric(text, "llm_service_errors_total", 'code="invalid_json"') == 1
    assert metric(text, "llm_service_upstream_requests_total", 'outcome="success"') == 2
    assert metric(text, "llm_service_upstream_requests_total", 'outcome="upstream_error"') == 1
    assert metric(text, "llm_service_upstream_requests_total", 'outcome="cancelled"') == 1
    assert metric(text, "llm_service_time_to_first_token_seconds_count") == 3
    gaps = metric(text, "llm_service_inter_token_gap_seconds_count")
    assert gaps == (3 - 1) + (2 - 1) + (cancelled_frames - 1)
    assert metric(text, "llm_service_turn_duration_seconds_count") == 4
    assert metric(text, "llm_service_cancel_latency_seconds_count") == 1
    assert "session_id=" not in text  # no series per session

    monitoring_health = await service.get("/health", monitoring=True)
    assert monitoring_health.status_code == 200
    assert monitoring_health.json()["active_connections"] == 1
    await client.close()


async def test_monitoring_health_stays_200_when_the_engine_is_down(
    service: RunningService, fake_ollama: FakeOllama
) -> None:
    await fake_ollama.refuse()
    assert (await service.get("/health")).status_code == 503
    liveness = await service.get("/health", monitoring=True)
    assert liveness.status_code == 200
    assert liveness.json()["status"] == "unhealthy"
    assert liveness.json()["ollama_connection"] is False


async def test_health_probe_is_cached(fake_ollama: FakeOllama) -> None:
    settings = make_settings(ollama_base_url=fake_ollama.url, health_cache_ttl_s=30.0)
    async with running_service(settings) as service:
        answers = await asyncio.gather(*(service.get("/health") for _ in range(20)))
        assert all(a.status_code == 200 for a in answers)
        assert fake_ollama.hits.get("/api/version") == 1


async def test_two_sessions_are_isolated(service: RunningService, fake_ollama: FakeOllama) -> None:
    fake_ollama.default_reply = Reply(chunks=["r"] * 30, delay=0.005)
    a, b = await service.connect(), await service.connect()
    await a.start()
    await b.start()
    await a.send({"type": "start_session", "config": {"system_prompt": "A"}})
    await b.send({"type": "start_session", "config": {"system_prompt": "B"}})
    await a.recv()
    await b.recv()
    fa, fb = await asyncio.gather(a.turn("from a"), b.turn("from b"))
    assert tokens_of(fa) == tokens_of(fb) == ["r"] * 30
    systems = sorted(
        (c.messages[0]["content"], c.messages[1]["content"]) for c in fake_ollama.chats
    )
    assert systems == [("A", "from a"), ("B", "from b")]
    await a.close()
    await b.close()


async def test_known_label_values_are_exported_at_zero_from_the_start(
    service: RunningService, fake_ollama: FakeOllama
) -> None:
    # rate() over a counter sees an event only once its series exists
    text = (await service.get("/metrics", monitoring=True)).text
    assert metric(text, "llm_service_turns_total", 'outcome="failed"') == 0
    assert metric(text, "llm_service_errors_total", 'code="upstream_unavailable"') == 0
    assert metric(text, "llm_service_tool_calls_total", 'outcome="malformed"') == 0
    assert metric(text, "llm_service_connections_rejected_total", 'reason="max_connections"') == 0
    upstream = f'outcome="success",upstream="{fake_ollama.url}"'
    assert metric(text, "llm_service_upstream_requests_total", upstream) == 0
