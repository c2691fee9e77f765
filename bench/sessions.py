"""Sessions that outlive a socket: how fast a resume replays, what the Redis store costs the
hot path, and what detached sessions keep.

    .venv/bin/python bench/sessions.py [--quick] [--only 1,2,3] [--logs DIR]

Everything runs on 127.0.0.1, each in its own process: a `redis-server` of the benchmark's own
on a free port (`--save "" --appendonly no`), the fast fake Ollama (`fake_upstream.py`), the
services (`python main.py websocket`, LLM_BACKEND=ollama, with the settings each scenario
names) and this process, the load generator. Each figure stands beside a baseline measured in
the same run. After the table: the services' warnings and errors counted from their logs, and
any service that had to be killed after SIGTERM.

1. resume latency (LLM_RESUME_GRACE_S=30): a session's client asks for a reply and closes its
   socket at once, having seen only `session_started` (seq 0); the fake answers 50 ms later,
   so the whole reply streams into the session's frame log with no socket attached. Once it
   has ended (the service's completed turns on /metrics; for a second replica, the record and
   the frame stream in Redis too), a new connection sends `resume` with `last_seq` 0: from
   sending it to the first replayed frame (and to the last), p50 and p99 over 30 sessions
   missing a 1,000-token reply (1,001 frames: the tokens and `response_complete`), beside
   sessions missing a 9-token one (10 frames), the baseline, resumed in alternating order.
   Three ways: LLM_SESSION_STORE=memory; redis, resumed on the replica that streamed the
   reply; redis, resumed on a second replica sharing the Redis, which replays from the Redis
   stream. Every replay is checked: the count announced, seqs 1..N in order, the text,
   `response_complete` last, `generating` false.
2. hot path: two services on one fake, LLM_SESSION_STORE=redis and memory (the baseline),
   driven alternately: tokens a second of one unpaced 3,000-token reply (median of 9, a fresh
   session each), with the CPU per token of the service and of redis-server; the first token
   of one-token replies (p50 and p99 per block of 50 turns, median of 5 blocks).
3. detached sessions: a fresh service, memory store, LLM_SESSION_TTL_S=5 (its sweeper runs
   every min(5 s, TTL)). Its RSS before (the baseline; after a warm-up whose sessions have
   expired), with 1,000 sessions open, after their sockets closed (per detached session,
   beside the same sessions while attached), and once they have expired (/health polled until
   the store holds none); then two more waves of 1,000 the same way, to tell memory that the
   allocators keep for reuse from a leak. All of it twice: with CPython's default allocator
   (pymalloc, whose 1 MiB arenas go back to the kernel only once every object in them is
   freed) and with PYTHONMALLOC=malloc (glibc's malloc for everything, which the sweeper's
   malloc_trim returns; what the Docker images run), and what malloc costs the hot path: two
   services on one fake, 3,000-token replies alternately, tokens/s and CPU per token.

`--quick` runs small counts in well under a minute, for CI. The exit status is non-zero only
when something failed to run; a missed goal is reported, not failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import redis.asyncio as aioredis

sys.path.insert(0, str(Path(__file__).resolve().parent))

import runner  # noqa: E402
import scenarios as sc  # noqa: E402
from fake_upstream import reply_text  # noqa: E402
from processes import (  # noqa: E402
    Proc,
    log_problems,
    machine,
    start_fake,
    start_redis,
    start_service_with,
)
from runner import Report, Row  # noqa: E402

from llm_service.sessions.redis import PREFIX  # noqa: E402
from tests.process import free_port  # noqa: E402

EXPECTED_WARNINGS = frozenset({"access_open"})  # no LLM_API_KEY on 127.0.0.1: as intended
WAYS = ("memory", "redis, same replica", "redis, second replica")
STORES = ("redis", "memory")  # scenario 2: measured, baseline
RESUME_GOAL_MS = 20.0
SWEEP_S = 5.0  # the registry's sweeper period, at most
STOP_LIMIT_S = 5.0  # ample for a service with LLM_SHUTDOWN_GRACE_S=1 and no socket left
MIB = 1024.0
# scenario 3: CPython's own small-object allocator (the default), and glibc's malloc for
# everything, which the sweeper's malloc_trim can hand back to the kernel
ALLOCATORS: dict[str, dict[str, str]] = {"pymalloc": {}, "malloc": {"PYTHONMALLOC": "malloc"}}


@dataclass(frozen=True)
class Plan:
    """How much each scenario does."""

    resumes: int = 30
    long_reply: int = 1000
    short_reply: int = 9
    answer_after_s: float = 0.05
    grace_s: float = 30.0
    stream_tokens: int = 3000
    stream_rounds: int = 9
    turns: int = 50
    turn_blocks: int = 5
    detached: int = 1000
    ttl_s: float = 5.0
    waves: int = 3


QUICK = Plan(
    resumes=8, stream_tokens=300, stream_rounds=3, turns=10, turn_blocks=1, detached=200,
    ttl_s=2.0, waves=2,
)  # fmt: skip


@dataclass(frozen=True)
class Service:
    """A service process and its monitoring port (/metrics)."""

    proc: Proc
    monitoring: int


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def keep(stack: contextlib.AsyncExitStack, proc: Proc, report: Report) -> Proc:
    """Stop `proc` when `stack` closes (SIGTERM, then SIGKILL after `STOP_LIMIT_S`), and note
    what its log says went wrong, and whether it had to be killed."""
    scenario = report.scenario

    def stop() -> None:
        if proc.popen.poll() is None:
            proc.popen.terminate()
            try:
                proc.popen.wait(timeout=STOP_LIMIT_S)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait(timeout=5)
                report.notes.append(
                    f"{scenario}: {proc.log.name}: still running {STOP_LIMIT_S:g} s after "
                    "SIGTERM, killed"
                )
        # once the process has exited: its log is complete
        report.notes.extend(f"{scenario}: {n}" for n in log_problems(proc, EXPECTED_WARNINGS))

    stack.callback(stop)
    return proc


def start(
    stack: contextlib.AsyncExitStack, report: Report, logs: Path, fake: Proc, **settings: str
) -> Service:
    monitoring = free_port()
    env = {
        "LLM_BACKEND": "ollama",
        "OLLAMA_BASE_URL": fake.http,
        "LLM_MONITORING_PORT": str(monitoring),
        **settings,
    }
    return Service(keep(stack, start_service_with(env, logs), report), monitoring)


def start_store(stack: contextlib.AsyncExitStack, logs: Path) -> tuple[Proc, str]:
    """A redis-server stopped when `stack` closes, and its LLM_SESSION_STORE URL."""
    redis = start_redis(logs)
    stack.callback(redis.stop)
    return redis, f"redis://127.0.0.1:{redis.port}/0"


def redis_client(stack: contextlib.AsyncExitStack, redis: Proc) -> aioredis.Redis:
    client = aioredis.Redis(host="127.0.0.1", port=redis.port, socket_timeout=5)
    stack.push_async_callback(client.aclose)
    return client


# 1. Resume latency -----------------------------------------------------------------------


async def resume_latency(plan: Plan, logs: Path, report: Report) -> None:
    async with contextlib.AsyncExitStack() as stack:
        redis, url = start_store(stack, logs)
        fake = keep(stack, start_fake(logs), report)
        grace = {"LLM_RESUME_GRACE_S": f"{plan.grace_s:g}"}
        memory = start(stack, report, logs, fake, LLM_SESSION_STORE="memory", **grace)
        a = start(stack, report, logs, fake, LLM_SESSION_STORE=url, **grace)
        b = start(stack, report, logs, fake, LLM_SESSION_STORE=url, **grace)
        client = redis_client(stack, redis)
        ways = dict(zip(WAYS, ((memory, memory), (a, a), (a, b)), strict=True))
        replies = (plan.long_reply, plan.short_reply)
        runs: dict[tuple[str, int], list[sc.ResumeRun]] = {
            (way, n): [] for way in WAYS for n in replies
        }
        completed = {memory.monitoring: 0, a.monitoring: 0}  # turns each should have completed
        for i in range(-1, plan.resumes):  # round -1 warms up
            left: list[tuple[str, int, sc.Resumable]] = []
            for way, (origin, _) in ways.items():
                for n in replies:
                    message = f"tokens={n} rate=0 delay={plan.answer_after_s:g}"
                    left.append((way, n, await sc.leave_mid_turn(origin.proc.ws, message)))
                    completed[origin.monitoring] += 1
            elsewhere = [(s, n + 1) for way, n, s in left if ways[way][0] != ways[way][1]]
            await replies_ended(completed, elsewhere, client)
            for way, n, session in left if i % 2 == 0 else left[::-1]:
                run = await sc.ws_resume(ways[way][1].proc.ws, session)
                check_replay(run, n, way)
                if i >= 0:
                    runs[(way, n)].append(run)
    report_resumes(plan, runs, report)


async def replies_ended(
    completed: dict[int, int],
    elsewhere: list[tuple[sc.Resumable, int]],
    client: aioredis.Redis,
    limit_s: float = 30.0,
) -> None:
    """Wait until each service has completed its turns, and the sessions to be resumed on
    another replica are in Redis as they ended (record and frame stream, up to that seq)."""
    counts: dict[int, float] = {}
    try:
        async with asyncio.timeout(limit_s):
            while True:
                counts = {port: await completed_turns(port) for port in completed}
                if all(counts[port] >= n for port, n in completed.items()) and all(
                    [await stored(client, s, seq) for s, seq in elsewhere]
                ):
                    return
                await asyncio.sleep(0.01)
    except TimeoutError as exc:
        raise sc.BenchError(
            f"the replies did not end within {limit_s:g} s: completed turns {counts}, "
            f"expected {completed}"
        ) from exc


async def completed_turns(monitoring: int) -> float:
    samples = await sc.scrape(monitoring)
    return sum(
        value
        for name, labels, value in samples
        if name == "llm_service_turns_total" and 'outcome="completed"' in labels
    )


async def stored(client: aioredis.Redis, session: sc.Resumable, seq: int) -> bool:
    """Whether Redis holds `session` as ended at `seq`: its record, its frames up to it."""
    raw = await client.get(f"{PREFIX}session:{session.session_id}")
    if raw is None:
        return False
    record = orjson.loads(raw)
    if record.get("generating") or record.get("seq") != seq:
        return False
    key = f"{PREFIX}frames:{session.session_id}:{record.get('epoch', 0)}"  # its holder's
    last = await client.xrevrange(key, count=1)
    return last is not None and bool(last) and last[0][0] == f"{seq}-1".encode()


def check_replay(run: sc.ResumeRun, tokens: int, way: str) -> None:
    """The replay is the whole reply the client missed, in order, and nothing else."""
    frames = tokens + 1
    problems = []
    if run.replayed != frames:
        problems.append(f"replayed {run.replayed} frames, not {frames}")
    if run.seqs != list(range(1, frames + 1)):
        problems.append(f"seqs {run.seqs[:3]}...{run.seqs[-3:]}, not 1..{frames}")
    if run.text != reply_text(tokens):
        problems.append("the text differs from the reply")
    if run.last_type != "response_complete":
        problems.append(f"ended with {run.last_type}")
    if run.generating:
        problems.append("generating is true")
    if problems:
        raise sc.BenchError(f"{way}, {tokens}-token reply: {'; '.join(problems)}")


def report_resumes(
    plan: Plan, runs: dict[tuple[str, int], list[sc.ResumeRun]], report: Report
) -> None:
    long_, short = plan.long_reply, plan.short_reply
    label = f"{long_ + 1:,} frames missed (baseline: {short + 1}), {plan.resumes} resumes"
    for way in WAYS:
        first = {n: [r.first_s * 1000 for r in runs[(way, n)]] for n in (long_, short)}
        whole = {n: [r.last_s * 1000 for r in runs[(way, n)]] for n in (long_, short)}
        head = {n: [r.resumed_s * 1000 for r in runs[(way, n)]] for n in (long_, short)}
        p50, p99 = ({n: sc.percentile(v, q) for n, v in first.items()} for q in (50, 99))
        last50 = {n: sc.percentile(v, 50) for n, v in whole.items()}
        d50, d99, dlast = p50[long_] - p50[short], p99[long_] - p99[short], last50[long_]
        report.rows += [
            Row("1 resume", f"{way}: p50 ms to the first replayed frame, {label}", p50[long_],
                p50[short], f"{d50:+.2f} ms", digits=2),
            Row("1 resume", f"{way}: p99 ms to the first replayed frame", p99[long_],
                p99[short], f"{d99:+.2f} ms", f"< {RESUME_GOAL_MS:g} ms",
                p99[long_] < RESUME_GOAL_MS, digits=2),
            Row("1 resume", f"{way}: p50 ms to the last replayed frame", last50[long_],
                last50[short], f"{dlast - last50[short]:+.2f} ms", digits=2),
        ]  # fmt: skip
        report.notes.append(
            f"1: {way}: p50 / max ms to `session_resumed` {sc.percentile(head[long_], 50):.2f}"
            f" / {max(head[long_]):.2f} ({long_ + 1:,} frames), "
            f"{sc.percentile(head[short], 50):.2f} / {max(head[short]):.2f} ({short + 1}); "
            f"max to the first replayed frame {max(first[long_]):.2f} / {max(first[short]):.2f}"
        )
    count = sum(len(v) for v in runs.values())
    report.notes.append(
        f"1: all {count} measured replays (and the warm-up's) checked: the count announced, "
        "seqs 1..N in order, the text, `response_complete` last, `generating` false"
    )


# 2. Hot path with the Redis store ----------------------------------------------------------


def ordered(round_: int) -> tuple[str, ...]:
    return STORES if round_ % 2 == 0 else STORES[::-1]


async def hot_path(plan: Plan, logs: Path, report: Report) -> None:
    async with contextlib.AsyncExitStack() as stack:
        redis, url = start_store(stack, logs)
        fake = keep(stack, start_fake(logs), report)
        services = {
            "redis": start(stack, report, logs, fake, LLM_SESSION_STORE=url),
            "memory": start(stack, report, logs, fake, LLM_SESSION_STORE="memory"),
        }
        await stream_rate(plan, services, redis, report)
        await first_token(plan, services, report)
        client = redis_client(stack, redis)
        streams, entries, frames = 0, 0, 0
        async for key in client.scan_iter(match=f"{PREFIX}frames:*", count=1000):
            streams += 1
            stream: Any = await client.xrange(key)
            for _, fields in stream:
                entries += 1
                frames += sum(bytes(value).count(b"\n") + 1 for value in fields.values())
        report.notes.append(
            f"2: Redis held {await client.dbsize()} keys at the end: {streams} frame streams, "
            f"{frames:,} frames in {entries:,} entries (a batch an entry; each stream keeps "
            "about the last LLM_RESUME_BUFFER_FRAMES frames)"
        )


async def stream_rate(
    plan: Plan, services: dict[str, Service], redis: Proc, report: Report
) -> None:
    rates: dict[str, list[float]] = {s: [] for s in STORES}
    cpu = dict.fromkeys(STORES, 0.0)
    store_cpu = dict.fromkeys(STORES, 0.0)  # redis-server's, during each store's runs
    for store in STORES:  # warm-up
        await sc.ws_stream(services[store].proc.ws, plan.stream_tokens)
    for r in range(plan.stream_rounds):
        for store in ordered(r):
            proc = services[store].proc
            before, before_redis = proc.cpu_seconds(), redis.cpu_seconds()
            run = await sc.ws_stream(proc.ws, plan.stream_tokens)
            rates[store].append(run.tokens_per_second)
            cpu[store] += proc.cpu_seconds() - before
            store_cpu[store] += redis.cpu_seconds() - before_redis
    got, base = median(rates["redis"]), median(rates["memory"])
    tokens = plan.stream_tokens * plan.stream_rounds
    us = {s: cpu[s] / tokens * 1e6 for s in STORES}
    redis_us = {s: store_cpu[s] / tokens * 1e6 for s in STORES}
    figure = (
        f"tokens/s, {plan.stream_tokens}-token reply (median of {plan.stream_rounds}), "
        "LLM_SESSION_STORE=redis (baseline: memory)"
    )
    report.rows += [
        Row("2 hot path", figure, got, base, f"{got / base:.2f}x", ">= 0.8x memory",
            got >= 0.8 * base, digits=0),
        Row("2 hot path", "CPU us per token in the service", us["redis"], us["memory"],
            f"{us['redis'] / us['memory']:.2f}x"),
        Row("2 hot path", "CPU us per token in redis-server (during each store's runs)",
            redis_us["redis"], redis_us["memory"]),
    ]  # fmt: skip
    report.notes.append(
        "2: tokens/s per run, redis "
        + ", ".join(f"{x:,.0f}" for x in rates["redis"])
        + "; memory "
        + ", ".join(f"{x:,.0f}" for x in rates["memory"])
    )


async def first_token(plan: Plan, services: dict[str, Service], report: Report) -> None:
    found = await sc.alternated_first_tokens(
        [services[s].proc.ws for s in STORES], plan.turns, plan.turn_blocks
    )
    p50 = {s: f[0] for s, f in zip(STORES, found, strict=True)}
    p99 = {s: f[1] for s, f in zip(STORES, found, strict=True)}
    label = f"(median of {plan.turn_blocks} blocks of {plan.turns} turns)"
    d50, d99 = p50["redis"] - p50["memory"], p99["redis"] - p99["memory"]
    report.rows += [
        Row("2 hot path", f"first token p50 ms {label}", p50["redis"], p50["memory"],
            f"{d50:+.2f} ms", "< +2 ms", d50 < 2.0, digits=2),
        Row("2 hot path", f"first token p99 ms {label}", p99["redis"], p99["memory"],
            f"{d99:+.2f} ms", digits=2),
    ]  # fmt: skip


# 3. Detached sessions --------------------------------------------------------------------


@dataclass
class Wave:
    """RSS in KiB around one wave of sessions opened, detached and expired."""

    attached: int
    detached: int
    expired: int
    expiry_s: float  # from the last socket closed to the store holding none


async def detached_sessions(plan: Plan, logs: Path, report: Report) -> None:
    for allocator, env in ALLOCATORS.items():
        before, waves = await detached_waves(plan, logs, report, env)
        report_detached(plan, allocator, before, waves, report)
    await allocator_cost(plan, logs, report)


async def detached_waves(
    plan: Plan, logs: Path, report: Report, env: dict[str, str]
) -> tuple[int, list[Wave]]:
    async with contextlib.AsyncExitStack() as stack:
        fake = keep(stack, start_fake(logs), report)
        settings = {"LLM_SESSION_STORE": "memory", "LLM_SESSION_TTL_S": f"{plan.ttl_s:g}"}
        service = start(stack, report, logs, fake, **settings, **env).proc
        http = httpx.AsyncClient(base_url=service.http, timeout=5)
        stack.push_async_callback(http.aclose)
        warm = await sc.open_sessions(service.ws, 5)  # warm-up: a turn each, then detach
        for ws in warm:
            await ws.send(sc.user_message("tokens=5"))
            await sc.read_until_complete(ws)
        await sc.close_sessions(warm)
        await held(http, lambda sessions, _: sessions == 0, plan.ttl_s + SWEEP_S + 10)
        await asyncio.sleep(0.5)
        before = service.rss_kib()
        return before, [await wave(plan, service, http) for _ in range(plan.waves)]


async def allocator_cost(plan: Plan, logs: Path, report: Report) -> None:
    """What PYTHONMALLOC=malloc costs the hot path: two services on one fake, alternately."""
    async with contextlib.AsyncExitStack() as stack:
        fake = keep(stack, start_fake(logs), report)
        services = {
            allocator: start(stack, report, logs, fake, LLM_SESSION_STORE="memory", **env).proc
            for allocator, env in ALLOCATORS.items()
        }
        order = tuple(services)
        rates: dict[str, list[float]] = {a: [] for a in order}
        cpu = dict.fromkeys(order, 0.0)
        for proc in services.values():  # warm-up
            await sc.ws_stream(proc.ws, plan.stream_tokens)
        for r in range(plan.stream_rounds):
            for allocator in order if r % 2 == 0 else order[::-1]:
                proc = services[allocator]
                before = proc.cpu_seconds()
                rates[allocator].append((await sc.ws_stream(proc.ws, plan.stream_tokens))
                                        .tokens_per_second)  # fmt: skip
                cpu[allocator] += proc.cpu_seconds() - before
    got, base = median(rates["malloc"]), median(rates["pymalloc"])
    us = {a: cpu[a] / (plan.stream_tokens * plan.stream_rounds) * 1e6 for a in order}
    report.rows += [
        Row("3 detached", f"what malloc costs: tokens/s, {plan.stream_tokens}-token reply "
            f"(median of {plan.stream_rounds}), PYTHONMALLOC=malloc (baseline: pymalloc)",
            got, base, f"{got / base:.2f}x", digits=0),
        Row("3 detached", "what malloc costs: CPU us per token in the service", us["malloc"],
            us["pymalloc"], f"{us['malloc'] / us['pymalloc']:.2f}x"),
    ]  # fmt: skip


async def wave(plan: Plan, service: Proc, http: httpx.AsyncClient) -> Wave:
    n = plan.detached
    sockets = await sc.open_sessions(service.ws, n)
    await asyncio.sleep(1.0)
    attached = service.rss_kib()
    await sc.close_sessions(sockets)
    closed = time.monotonic()
    await held(http, lambda sessions, detached: sessions == detached == n, 10)
    await asyncio.sleep(1.0)
    detached = service.rss_kib()
    await held(http, lambda sessions, _: sessions == 0, plan.ttl_s + SWEEP_S + 10)
    expiry_s = time.monotonic() - closed
    await asyncio.sleep(1.0)
    return Wave(attached, detached, service.rss_kib(), expiry_s)


async def held(
    http: httpx.AsyncClient, until: Callable[[int, int], bool], limit_s: float
) -> tuple[int, int]:
    """Poll /health until `until(sessions, detached)` of its session store holds."""
    counts = (-1, -1)
    try:
        async with asyncio.timeout(limit_s):
            while True:
                store = (await http.get("/health")).json()["session_store"]
                counts = int(store["sessions"]), int(store["detached"])
                if until(*counts):
                    return counts
                await asyncio.sleep(0.1)
    except TimeoutError as exc:
        raise sc.BenchError(
            f"/health: the store still counted (sessions, detached) {counts} after {limit_s:g} s"
        ) from exc


def report_detached(
    plan: Plan, allocator: str, before: int, waves: list[Wave], report: Report
) -> None:
    n, first = plan.detached, waves[0]
    per_detached = (first.detached - before) / n
    per_attached = (first.attached - before) / n
    left = (first.expired - before) / MIB
    sweep = min(SWEEP_S, plan.ttl_s)
    longest = max(w.expiry_s for w in waves)
    name = "pymalloc: " if allocator == "pymalloc" else "PYTHONMALLOC=malloc: "
    report.rows += [
        Row("3 detached", f"{name}RSS MiB with {n:,} sessions detached (baseline: before they were "
            "opened)", first.detached / MIB, before / MIB,
            f"{(first.detached - before) / MIB:+.1f} MiB"),
        Row("3 detached", f"{name}KiB RSS per detached session (baseline: the same {n:,} while "
            "attached)", per_detached, per_attached,
            f"{per_detached / per_attached:.2f}x" if per_attached > 0 else ""),
        Row("3 detached", f"{name}RSS MiB once they expired, TTL {plan.ttl_s:g} s (baseline: "
            "before)",
            first.expired / MIB, before / MIB, f"{left:+.1f} MiB", "< +5 MiB", left < 5),
        Row("3 detached", f"{name}s from the sockets' close to none left (TTL {plan.ttl_s:g} s, "
            f"sweep every {sweep:g} s), longest of {len(waves)} waves", longest, "-",
            goal=f"<= {plan.ttl_s + sweep + 0.5:g} s", met=longest <= plan.ttl_s + sweep + 0.5),
    ]  # fmt: skip
    if len(waves) > 1:
        last, i = waves[-1], len(waves)
        report.rows += [
            Row("3 detached", f"{name}RSS MiB with wave {i} of {n:,} detached (baseline: wave 1)",
                last.detached / MIB, first.detached / MIB,
                f"{(last.detached - first.detached) / MIB:+.1f} MiB"),
            Row("3 detached", f"{name}RSS MiB once wave {i} expired (baseline: once wave 1 had)",
                last.expired / MIB, first.expired / MIB,
                f"{(last.expired - first.expired) / MIB:+.1f} MiB"),
        ]  # fmt: skip
    report.notes.append(
        f"3: {allocator}: RSS MiB per wave (attached, detached, expired; expiry s): "
        + "; ".join(
            f"{w.attached / MIB:.1f}, {w.detached / MIB:.1f}, {w.expired / MIB:.1f}; "
            f"{w.expiry_s:.1f} s"
            for w in waves
        )
        + f"; before {before / MIB:.1f}"
    )


# The report ------------------------------------------------------------------------------


def render(report: Report) -> str:
    return runner.render(
        report,
        "redis-server, fake and services",
        (
            "1: measured sessions that missed a long reply, baseline ones that missed a short "
            "one. 2: measured LLM_SESSION_STORE=redis, baseline memory. 3: RSS as the kernel "
            "counts it: what the service frees but its allocators keep for reuse still counts; "
            "the cost of malloc: measured PYTHONMALLOC=malloc, baseline pymalloc."
        ),
    )


def main() -> None:
    steps = {"1": resume_latency, "2": hot_path, "3": detached_sessions}
    runner.main(__doc__, steps, (Plan(), QUICK), lambda: Report(machine()), render)


if __name__ == "__main__":
    main()
