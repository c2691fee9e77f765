"""Engines and pools measured: the `openai` backend beside `ollama`, and pools of upstreams.

    .venv/bin/python bench/engines.py [--quick] [--only a,b,c] [--logs DIR]

Everything runs on 127.0.0.1: fakes (`fake_upstream.py`, one process each, speaking Ollama's
`/api/chat` and OpenAI's `/v1/chat/completions`), the service (`python main.py websocket`
with default settings, but room for connections and long replies) and this process, the load
generator. Each figure stands beside a baseline measured in the same run. After the table: the
service's warnings and errors counted from its log, and its upstream counters from /metrics.

a. relay overhead: one fake behind two services, LLM_BACKEND=openai and LLM_BACKEND=ollama
   (the baseline), driven alternately: tokens a second of one unpaced 3,000-token reply
   (median of 9), and the first token of one-token replies (p50 and p99 per block of 50
   turns, median of 5 blocks);
b. pool spread: 2, 3 and 4 fakes behind one service (LLM_BACKEND=openai, comma-separated
   OPENAI_BASE_URL); 200 sessions do 3 short turns each, and each fake counts turns by session
   (`sid=`): the largest deviation of an upstream's share of sessions from an even share (the
   baseline: the same for sessions placed uniformly at random, median of 2,000 draws), and the
   share of sessions whose turns all landed on one upstream;
c. failover: 3 fakes; 60 sessions stream 100 tokens at 20/s while 15 more start short turns
   (first token after 50 ms) one after another; the fake serving the most of those 15 is
   SIGKILLed mid-load, and the short turns go on for 3 s. Turns failed before their first
   token, streams on the killed fake ended with `upstream_error`, duplicated text, new turns
   whose first token took over 1 s, and their p99 first token during the failure against
   before it (the baseline).

`--quick` runs small counts in well under a minute, for CI. The exit status is non-zero only
when something failed to run; a missed goal is reported, not failed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import random
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from websockets.asyncio.client import ClientConnection

sys.path.insert(0, str(Path(__file__).resolve().parent))

import runner  # noqa: E402
import scenarios as sc  # noqa: E402
from fake_upstream import reply_text  # noqa: E402
from processes import Proc, log_problems, machine, start_fake, start_service_with  # noqa: E402
from runner import Report, Row  # noqa: E402

from tests.process import free_port  # noqa: E402

ENGINES = ("openai", "ollama")
SLOW_FIRST_TOKEN_S = 1.0
EXPECTED_WARNINGS = frozenset({"access_open"})  # no LLM_API_KEY on 127.0.0.1: as intended
_LABEL_NOISE = re.compile(r'upstream=|outcome=|http://127\.0\.0\.1|/v1|"')


@dataclass(frozen=True)
class Plan:
    """How much each scenario does."""

    stream_tokens: int = 3000
    stream_rounds: int = 9
    turns: int = 50
    turn_blocks: int = 5
    pools: tuple[int, ...] = (2, 3, 4)
    pool_sessions: int = 200
    pool_turns: int = 3
    streams: int = 60
    stream_window_s: float = 1.0
    paced_tokens: int = 100
    paced_rate: float = 20.0
    probers: int = 15
    prober_delay_s: float = 0.05
    prober_pause_s: float = 0.1
    kill_after_s: float = 2.5
    kill_then_s: float = 3.0


QUICK = Plan(
    stream_tokens=300, stream_rounds=3, turns=10, turn_blocks=1, pools=(2, 3), pool_sessions=40,
    streams=15, stream_window_s=0.5, paced_tokens=40, probers=6, kill_after_s=1.0, kill_then_s=1.0,
)  # fmt: skip


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def ordered(round_: int) -> tuple[str, ...]:
    return ENGINES if round_ % 2 == 0 else ENGINES[::-1]


def keep(stack: contextlib.ExitStack, proc: Proc, report: Report) -> Proc:
    """Stop `proc` when `stack` closes, noting first what its log says went wrong."""
    scenario = report.scenario
    stack.callback(
        lambda: report.notes.extend(
            f"{scenario}: {n}" for n in log_problems(proc, EXPECTED_WARNINGS)
        )
    )
    stack.callback(proc.stop)  # first: the log is complete once the process has exited
    return proc


def openai_service(fakes: list[Proc], **extra: str) -> dict[str, str]:
    urls = ",".join(f"{fake.http}/v1" for fake in fakes)
    return {"LLM_BACKEND": "openai", "OPENAI_BASE_URL": urls, **extra}


# a. Relay overhead -----------------------------------------------------------------------


async def relay_overhead(plan: Plan, logs: Path, report: Report) -> None:
    with contextlib.ExitStack() as stack:
        fake = keep(stack, start_fake(logs), report)
        env = {
            "openai": openai_service([fake]),
            "ollama": {"LLM_BACKEND": "ollama", "OLLAMA_BASE_URL": fake.http},
        }
        services = {e: keep(stack, start_service_with(env[e], logs), report) for e in ENGINES}
        await stream_rate(plan, services, report)
        await first_token(plan, services, report)


async def stream_rate(plan: Plan, services: dict[str, Proc], report: Report) -> None:
    rates: dict[str, list[float]] = {e: [] for e in ENGINES}
    cpu = dict.fromkeys(ENGINES, 0.0)
    for engine in ENGINES:  # warm-up
        await sc.ws_stream(services[engine].ws, plan.stream_tokens)
    for r in range(plan.stream_rounds):
        for engine in ordered(r):
            proc = services[engine]
            before = proc.cpu_seconds()
            run = await sc.ws_stream(proc.ws, plan.stream_tokens)
            rates[engine].append(run.tokens_per_second)
            cpu[engine] += proc.cpu_seconds() - before
    got, base = median(rates["openai"]), median(rates["ollama"])
    us = {e: cpu[e] / (plan.stream_tokens * plan.stream_rounds) * 1e6 for e in ENGINES}
    figure = f"tokens/s, {plan.stream_tokens}-token reply (median of {plan.stream_rounds})"
    report.rows += [
        Row("a relay", figure, got, base, f"{got / base:.2f}x", ">= 0.9x ollama",
            got >= 0.9 * base, digits=0),
        Row("a relay", "CPU us per token in the service", us["openai"], us["ollama"],
            f"{us['openai'] / us['ollama']:.2f}x"),
    ]  # fmt: skip


async def first_token(plan: Plan, services: dict[str, Proc], report: Report) -> None:
    found = await sc.alternated_first_tokens(
        [services[e].ws for e in ENGINES], plan.turns, plan.turn_blocks
    )
    p50 = {e: f[0] for e, f in zip(ENGINES, found, strict=True)}
    p99 = {e: f[1] for e, f in zip(ENGINES, found, strict=True)}
    label = f"(median of {plan.turn_blocks} blocks of {plan.turns} turns)"
    d50, d99 = p50["openai"] - p50["ollama"], p99["openai"] - p99["ollama"]
    report.rows += [
        Row("a relay", f"first token p50 ms {label}", p50["openai"], p50["ollama"],
            f"{d50:+.2f} ms", "< +1 ms", d50 < 1.0, digits=2),
        Row("a relay", f"first token p99 ms {label}", p99["openai"], p99["ollama"],
            f"{d99:+.2f} ms", digits=2),
    ]  # fmt: skip


# b. Pool spread --------------------------------------------------------------------------


async def pool_spread(plan: Plan, logs: Path, report: Report) -> None:
    n = plan.pool_sessions
    for k in plan.pools:
        with contextlib.ExitStack() as stack:
            fakes = [keep(stack, start_fake(logs), report) for _ in range(k)]
            service = keep(stack, start_service_with(openai_service(fakes), logs), report)
            sockets = await sc.open_sessions(service.ws, n)
            try:
                await asyncio.gather(
                    *(short_turns(ws, f"p{k}-{i}", plan.pool_turns) for i, ws in enumerate(sockets))
                )
            finally:
                await sc.close_sessions(sockets)
            seen = [await sc.chats_by_session(fake.http) for fake in fakes]
        sids = [f"p{k}-{i}" for i in range(n)]
        counts = [[s.get(sid, 0) for s in seen] for sid in sids]
        owners = collections.Counter(c.index(max(c)) for c in counts)
        even = n / k
        deviation = max(abs(owners.get(j, 0) - even) for j in range(k)) / even * 100
        one = sum(sum(1 for x in c if x) == 1 and sum(c) == plan.pool_turns for c in counts)
        ideal = random_deviations(n, k, 2000, random.Random(k))
        within = sum(d <= 15 for d in ideal) / len(ideal) * 100
        report.notes.append(
            f"b: {k} upstreams: sessions per upstream {[owners.get(j, 0) for j in range(k)]}; "
            f"turns counted {sum(map(sum, counts))} of {n * plan.pool_turns}; sessions placed "
            f"uniformly at random stay within 15% of even in {within:.0f}% of 2,000 draws"
        )
        share = one / n * 100
        report.rows += [
            Row("b pool", f"{k} upstreams: largest deviation from an even share of {n} "
                "sessions, % (baseline: uniform random)", deviation, median(ideal),
                f"{deviation - median(ideal):+.1f} pts", "within 15%", deviation <= 15),
            Row("b pool", f"{k} upstreams: sessions whose {plan.pool_turns} turns all landed on "
                "one upstream, %", share, "-", goal=">= 99%", met=share >= 99),
        ]  # fmt: skip


async def short_turns(ws: ClientConnection, sid: str, turns: int) -> None:
    for _ in range(turns):
        await ws.send(sc.user_message(f"tokens=3 rate=0 sid={sid}"))
        count, _ = await sc.read_until_complete(ws)
        if count != 3:
            raise sc.BenchError(f"{sid}: expected 3 token frames, got {count}")


def random_deviations(n: int, k: int, draws: int, rng: random.Random) -> list[float]:
    """The largest deviation from an even share, in %, of `n` sessions placed at random."""
    even = n / k
    result = []
    for _ in range(draws):
        bins = collections.Counter(rng.randrange(k) for _ in range(n))
        result.append(max(abs(bins.get(j, 0) - even) for j in range(k)) / even * 100)
    return result


# c. Failover -----------------------------------------------------------------------------


@dataclass
class Failover:
    """What happened around the kill."""

    victim: Proc
    long: list[sc.Turn]  # the paced streams, one a session
    new: list[sc.Turn]  # the short turns started one after another
    on_victim: set[str]  # the sessions the killed fake had served
    started: float
    killed: float
    stopped: float  # when the last new turn was started
    marks: dict[str, float]  # when /metrics showed the breaker open, the probe failing
    counters: dict[str, int] = field(default_factory=dict)


async def failover(plan: Plan, logs: Path, report: Report) -> None:
    with contextlib.ExitStack() as stack:
        fakes = [keep(stack, start_fake(logs), report) for _ in range(3)]
        monitoring = free_port()
        env = openai_service(fakes, LLM_MONITORING_PORT=str(monitoring))
        service = keep(stack, start_service_with(env, logs), report)
        streams = await sc.open_sessions(service.ws, plan.streams)
        probers = await sc.open_sessions(service.ws, plan.probers)
        try:
            limit = plan.kill_after_s + plan.kill_then_s + plan.paced_tokens / plan.paced_rate
            async with asyncio.timeout(limit + 30):
                run = await kill_mid_load(plan, fakes, monitoring, streams, probers)
            run.counters = counters(await sc.scrape(monitoring))
        finally:
            await sc.close_sessions(streams + probers)
    report_failover(run, report)


async def kill_mid_load(
    plan: Plan,
    fakes: list[Proc],
    monitoring: int,
    streams: list[ClientConnection],
    probers: list[ClientConnection],
) -> Failover:
    started = time.monotonic()
    stop_at = started + plan.kill_after_s + plan.kill_then_s
    paced = f"tokens={plan.paced_tokens} rate={plan.paced_rate:g}"
    short = f"tokens=5 rate=0 delay={plan.prober_delay_s:g}"

    async def stream(i: int, ws: ClientConnection) -> sc.Turn:
        await asyncio.sleep(i * plan.stream_window_s / len(streams))
        return await sc.run_turn(ws, sc.Turn(f"L{i}", plan.paced_tokens), f"{paced} sid=L{i}")

    async def prober(j: int, ws: ClientConnection) -> list[sc.Turn]:
        turns: list[sc.Turn] = []
        await asyncio.sleep(j * plan.prober_pause_s / len(probers))
        while time.monotonic() < stop_at:
            turns.append(await sc.run_turn(ws, sc.Turn(f"N{j}", 5), f"{short} sid=N{j}"))
            await asyncio.sleep(plan.prober_pause_s)
        return turns

    async def kill() -> tuple[Proc, set[str], float, dict[str, float]]:
        await asyncio.sleep(plan.kill_after_s)
        # The fake serving the most short-turn sessions, so that some turns must fail over.
        seen = {fake.port: set(await sc.chats_by_session(fake.http)) for fake in fakes}
        victim = max(fakes, key=lambda f: (sum(sid[0] == "N" for sid in seen[f.port]), f.port))
        on_victim = seen[victim.port]
        victim.popen.kill()
        killed = time.monotonic()
        return victim, on_victim, killed, await watch(victim, killed)

    async def watch(victim: Proc, killed: float) -> dict[str, float]:
        label = f'upstream="{victim.http}/v1"'
        marks: dict[str, float] = {}
        while time.monotonic() < stop_at and len(marks) < 2:
            for name, labels, value in await sc.scrape(monitoring):
                if label in labels and name == "llm_service_circuit_state" and value == 2:
                    marks.setdefault("breaker open", time.monotonic() - killed)
                if label in labels and name == "llm_service_upstream_up" and value == 0:
                    marks.setdefault("probe down", time.monotonic() - killed)
            await asyncio.sleep(0.05)
        return marks

    long, new, (victim, on_victim, killed, marks) = await asyncio.gather(
        asyncio.gather(*(stream(i, ws) for i, ws in enumerate(streams))),
        asyncio.gather(*(prober(j, ws) for j, ws in enumerate(probers))),
        kill(),
    )
    every_new = [t for turns in new for t in turns]
    return Failover(victim, long, every_new, on_victim, started, killed, stop_at, marks)


def counters(samples: list[tuple[str, str, float]]) -> dict[str, int]:
    """The service's engine requests by outcome and upstream, and its retries, by upstream."""
    names = ("llm_service_upstream_requests_total", "llm_service_upstream_retries_total")
    return {
        f"{name[21:-6]} {_LABEL_NOISE.sub('', labels).replace(',', ' ')}": int(value)
        for name, labels, value in samples
        if name in names
    }


def report_failover(run: Failover, report: Report) -> None:
    every = [*run.long, *run.new]
    unstarted = [t for t in every if t.first_s is None and t.end != "complete"]
    victims = [t for t in run.long if t.sid in run.on_victim]
    cut = [t for t in victims if t.end == "upstream_error"]
    others = [t for t in run.long if t.sid not in run.on_victim]
    whole = [t for t in others if t.end == "complete" and t.text == reply_text(t.tokens)]
    duplicated = [t for t in every if not reply_text(t.tokens).startswith(t.text)]
    before = [t.first_s * 1000 for t in run.new if t.sent < run.killed and t.first_s is not None]
    after = [t for t in run.new if t.sent >= run.killed]
    moved = [t for t in after if t.sid in run.on_victim]
    served = [t for t in moved if t.end == "complete"]
    during = [t.first_s * 1000 for t in after if t.first_s is not None]
    slow = [t for t in after if t.first_s is None or t.first_s > SLOW_FIRST_TOKEN_S]
    p99_before, p99_during = sc.percentile(before, 99), sc.percentile(during, 99)
    ratio = p99_during / p99_before
    ends = collections.Counter(t.end for t in every)
    marks = [
        f"{mark} {run.marks[mark] * 1000:.0f} ms after the kill" if mark in run.marks else
        f"{mark}: not within {run.stopped - run.killed:.1f} s"
        for mark in ("breaker open", "probe down")
    ]  # fmt: skip
    report.notes += [
        f"c: killed {run.victim.name}-{run.victim.port} {run.killed - run.started:.2f} s in; "
        f"turn endings {dict(ends)}; slowest first token after the kill "
        f"{max(during, default=math.nan):.1f} ms; the killed upstream on /metrics (polled "
        f"every 50 ms): {', '.join(marks)}",
        f"c: the service's counters at the end: {run.counters}",
    ]
    s, slow_s = "c failover", f"{SLOW_FIRST_TOKEN_S:g} s"
    report.rows += [
        Row(s, "turns failed before their first token", len(unstarted), "-",
            f"of {len(every)}", "0", not unstarted, digits=0),
        Row(s, "streams on the killed upstream ended with upstream_error", len(cut), "-",
            f"of {len(victims)}", "all", bool(victims) and len(cut) == len(victims), digits=0),
        Row(s, "streams on the other upstreams completed whole", len(whole), "-",
            f"of {len(others)}", "all", len(whole) == len(others), digits=0),
        Row(s, "turns with duplicated or out-of-order text", len(duplicated), "-",
            f"of {len(every)}", "0", not duplicated, digits=0),
        Row(s, "new turns after the kill, of sessions on the killed upstream, completed",
            len(served), "-", f"of {len(moved)}", "all", bool(moved) and served == moved,
            digits=0),
        Row(s, f"new turns after the kill with first token > {slow_s} (or none)", len(slow),
            "-", f"of {len(after)}", "0", not slow, digits=0),
        Row(s, "new turns' p99 first token ms, during the failure (baseline: before)",
            p99_during, p99_before, f"{ratio:.2f}x", "<= 2x", ratio <= 2),
    ]  # fmt: skip


# The report ------------------------------------------------------------------------------


def render(report: Report) -> str:
    return runner.render(
        report,
        "fakes and service",
        "a: measured LLM_BACKEND=openai, baseline LLM_BACKEND=ollama, one fake.",
    )


def main() -> None:
    steps = {"a": relay_overhead, "b": pool_spread, "c": failover}
    runner.main(__doc__, steps, (Plan(), QUICK), lambda: Report(machine()), render)


if __name__ == "__main__":
    main()
