"""The performance suite: the service measured side by side with a bare relay, in one run.

    .venv/bin/python bench/suite.py [--quick] [--json PATH] [--only 1,3]

Everything runs on 127.0.0.1: a fast fake Ollama (`fake_upstream.py`, its own process), the
service (`python main.py websocket`, LLM_BACKEND=ollama), and the baseline
(`baseline_relay.py`: a few dozen lines of FastAPI forwarding one frame per token). This
process is the load generator (asyncio on uvloop, the `websockets` client). Runs alternate
between the targets (service, baseline, baseline, service, ...) and figures are medians;
where it applies, the fake read directly with httpx gives the floor. Scenarios:

1. single stream: tokens a second relayed for one unpaced reply (3,000 tokens), and the
   target's CPU time per token;
2. first token: time from sending `user_message` to the first token frame of one-token
   replies (blocks of 50 turns on one session; p50 and p99 per block, median over blocks);
3. concurrency: N sessions at once (their messages sent over 1 s), each streaming 100 tokens
   at 20 a second; the largest N, stepping up, at which every reply completes, its last
   token no more than 1 s behind the upstream's schedule, and the p99 gap between token
   frames stays under 150 ms (steps of 25 to 2,000, then the interval between the last
   pass and the first failure halved twice; a failing step is tried once more, the machine
   being shared);
4. memory: resident memory per idle session (1,000 sessions that got `session_started`),
   each round in freshly started target processes;
5. cancel latency: from sending `cancel` to the fake seeing its response closed.

`--quick` runs small counts in well under a minute, for CI. The exit status is non-zero only
when something failed to run; a missed goal is reported, not failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import signal
import statistics
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

import scenarios as sc  # noqa: E402
from processes import (  # noqa: E402
    Proc,
    machine,
    machine_busy,
    start_baseline,
    start_fake,
    start_service,
)

GAP_LIMIT_MS = 150.0
LAG_LIMIT_MS = 1000.0  # a reply "completes" when its last token is at most this late
TARGETS = ("service", "baseline")
STEPS = (25, 50, 100, 150, 200, 300, 400, 500, 600, 800, 1000, 1200, 1500, 2000)


@dataclass(frozen=True)
class Plan:
    """How much each scenario does."""

    stream_tokens: int = 3000
    stream_rounds: int = 9
    turns: int = 50
    turn_blocks: int = 5
    level_tokens: int = 100
    level_rate: float = 20.0
    levels: tuple[int, ...] = STEPS
    concurrency_budget_s: float = 420.0
    idle_sessions: int = 1000
    memory_rounds: int = 3
    cancels: int = 50
    cancel_rate: float = 200.0
    refinements: int = 2


QUICK = Plan(
    stream_tokens=300,
    stream_rounds=3,
    turns=10,
    turn_blocks=1,
    level_tokens=20,
    levels=(10, 25, 50),
    concurrency_budget_s=20.0,
    idle_sessions=100,
    memory_rounds=1,
    cancels=10,
    refinements=0,
)


@dataclass
class Row:
    """One line of the report."""

    scenario: str
    figure: str
    service: float | None
    baseline: float | None
    compare: str = ""  # the ratio or the difference, formatted
    direct: float | None = None  # the fake read with httpx, where it applies
    goal: str = ""
    met: bool | None = None
    digits: int = 1


@dataclass
class Report:
    plan: Plan
    machine: dict[str, Any]
    rows: list[Row] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)


def ordered(round_: int) -> tuple[str, ...]:
    """service, baseline on even rounds; baseline, service on odd ones."""
    return TARGETS if round_ % 2 == 0 else TARGETS[::-1]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def by_target(*extra: str) -> dict[str, list[Any]]:
    return {name: [] for name in (*TARGETS, *extra)}


class Suite:
    """The five scenarios against the running targets."""

    def __init__(self, plan: Plan, fake: Proc, logs: Path) -> None:
        self.plan = plan
        self.fake = fake
        self.logs = logs
        self.targets: dict[str, Proc] = {}
        self.levels: dict[str, list[dict[str, Any]]] = by_target()  # scenario 3's steps
        self.report = Report(plan, machine())

    async def single_stream(self, client: httpx.AsyncClient) -> None:
        p = self.plan
        runs: dict[str, list[float]] = by_target("direct")
        cpu = dict.fromkeys(TARGETS, 0.0)
        for target in TARGETS:  # warm-up
            await sc.ws_stream(self.targets[target].ws, p.stream_tokens)
        for r in range(p.stream_rounds):
            for target in ordered(r):
                proc = self.targets[target]
                before = proc.cpu_seconds()
                run = await sc.ws_stream(proc.ws, p.stream_tokens)
                cpu[target] += proc.cpu_seconds() - before
                runs[target].append(run.tokens_per_second)
            direct = await sc.direct_stream(client, p.stream_tokens)
            runs["direct"].append(direct.tokens_per_second)
        svc, base = median(runs["service"]), median(runs["baseline"])
        us = {t: cpu[t] / (p.stream_tokens * p.stream_rounds) * 1e6 for t in TARGETS}
        self.report.raw["single_stream"] = {"tokens_per_second": runs, "cpu_us_per_token": us}
        figure = f"tokens/s, {p.stream_tokens}-token reply (median of {p.stream_rounds})"
        self.report.rows += [
            Row("1 single stream", figure, svc, base, compare=f"{svc / base:.2f}x",
                direct=median(runs["direct"]), goal=">= 0.9x baseline", met=svc >= 0.9 * base,
                digits=0),
            Row("1 single stream", "CPU us per token in the target process", us["service"],
                us["baseline"], compare=f"{us['service'] / us['baseline']:.2f}x"),
        ]  # fmt: skip

    async def first_token(self, client: httpx.AsyncClient) -> None:
        p = self.plan
        blocks: dict[str, list[tuple[float, float]]] = by_target("direct")
        samples: dict[str, list[float]] = by_target("direct")
        for _ in range(p.turn_blocks):
            sockets = {t: await sc.open_session(self.targets[t].ws) for t in TARGETS}
            times: dict[str, list[float]] = by_target("direct")
            try:
                for t in TARGETS:  # warm-up: the first turn of a session sets it up
                    await sc.ws_first_token(sockets[t])
                await sc.direct_first_token(client)
                for turn in range(p.turns):
                    for t in ordered(turn):
                        times[t].append(await sc.ws_first_token(sockets[t]) * 1000)
                    times["direct"].append(await sc.direct_first_token(client) * 1000)
            finally:
                await sc.close_sessions(list(sockets.values()))
            for t, values in times.items():
                blocks[t].append((sc.percentile(values, 50), sc.percentile(values, 99)))
                samples[t] += values
        p50 = {t: median([b[0] for b in bs]) for t, bs in blocks.items()}
        p99 = {t: median([b[1] for b in bs]) for t, bs in blocks.items()}
        self.report.raw["first_token_ms"] = {"blocks_p50_p99": blocks, "samples": samples}
        label = f"(median of {p.turn_blocks} blocks of {p.turns} turns)"
        d50, d99 = p50["service"] - p50["baseline"], p99["service"] - p99["baseline"]
        self.report.rows += [
            Row("2 first token", f"p50 ms {label}", p50["service"], p50["baseline"],
                compare=f"{d50:+.2f} ms", direct=p50["direct"], goal="< +1 ms", met=d50 < 1.0,
                digits=2),
            Row("2 first token", f"p99 ms {label}", p99["service"], p99["baseline"],
                compare=f"{d99:+.2f} ms", direct=p99["direct"], goal="< +5 ms", met=d99 < 5.0,
                digits=2),
        ]  # fmt: skip

    async def concurrency(self) -> None:
        p = self.plan
        self.levels = by_target()
        best: dict[str, sc.Level | None] = dict.fromkeys(TARGETS)
        failed: dict[str, int | None] = dict.fromkeys(TARGETS)
        deadline = time.monotonic() + p.concurrency_budget_s
        for step, n in enumerate(p.levels):
            for t in ordered(step):
                if failed[t] is None and time.monotonic() < deadline:
                    level = await self._sustains(t, n)
                    if level is None:
                        failed[t] = n
                    else:
                        best[t] = level
            if all(f is not None for f in failed.values()) or time.monotonic() > deadline:
                break
        # Then halve the interval between the last N passed and the first failed, twice, for
        # a finer figure than the steps give.
        for round_ in range(p.refinements):
            for t in ordered(round_):
                passed, high = best[t], failed[t]
                low = passed.sessions if passed else 0
                if high is None or time.monotonic() > deadline:
                    continue
                n = (low + high) // 2
                if n in (low, high):
                    continue
                level = await self._sustains(t, n)
                if level is None:
                    failed[t] = n
                else:
                    best[t] = level
        # A target still passing when the steps or the time ran out sustains at least that N.
        alive = {t: failed[t] is None for t in TARGETS}
        self.report.raw["concurrency"] = {"levels": self.levels, "capped": alive}
        sustained = {t: (b.sessions if b else 0) for t, b in best.items()}
        gap = {t: (b.p99_gap_ms if b else None) for t, b in best.items()}
        first = {t: (b.p99_first_token_ms if b else None) for t, b in best.items()}
        base = sustained["baseline"]
        ratio = sustained["service"] / base if base else float("nan")
        note = " (at least: the steps or the time ran out)" if any(alive.values()) else ""
        figure = f"sessions sustained, {p.level_tokens} tokens at {p.level_rate:g}/s each{note}"
        self.report.rows += [
            Row("3 concurrency", figure, sustained["service"], base, compare=f"{ratio:.2f}x",
                goal=">= 0.9x baseline", met=ratio >= 0.9, digits=0),
            Row("3 concurrency", "p99 gap between token frames at that N, ms", gap["service"],
                gap["baseline"], goal=f"< {GAP_LIMIT_MS:g} ms"),
            Row("3 concurrency", "p99 first token at that N, ms", first["service"],
                first["baseline"]),
        ]  # fmt: skip

    async def _sustains(self, target: str, n: int) -> sc.Level | None:
        """Run a step, trying once more if it fails (the machine is shared); the passing
        step, or None."""
        for attempt in range(2):
            level, cpu = await self._level(target, n)
            self.levels[target].append(asdict(level) | {"cpu": cpu, "attempt": attempt + 1})
            if level.ok(GAP_LIMIT_MS, LAG_LIMIT_MS):
                return level
        return None

    async def _level(self, target: str, n: int) -> tuple[sc.Level, dict[str, float]]:
        """One step, with the CPU used meanwhile: by each process in cores (1.0 is one core
        busy), by the whole machine as a fraction of all its cores."""
        proc = self.targets[target]
        before = proc.cpu_seconds(), self.fake.cpu_seconds(), machine_busy()
        level = await sc.run_level(proc.ws, n, self.plan.level_tokens, self.plan.level_rate)
        busy, total = machine_busy()
        cpu = {
            "target": (proc.cpu_seconds() - before[0]) / level.seconds,
            "fake": (self.fake.cpu_seconds() - before[1]) / level.seconds,
            "client": level.client_cpu,
            "machine": (busy - before[2][0]) / max(total - before[2][1], 1),
        }
        print(
            f"  concurrency {target:8} N={n:5}: completed {level.completed}/{n}, p99 gap "
            f"{level.p99_gap_ms:6.1f} ms, p99 first token {level.p99_first_token_ms:6.1f} ms, "
            f"max lag {level.max_lag_ms:7.1f} ms; CPU target {cpu['target']:4.0%} client "
            f"{cpu['client']:4.0%} fake {cpu['fake']:4.0%}, machine {cpu['machine']:4.0%}",
            flush=True,
        )
        await asyncio.sleep(0.5)
        return level, cpu

    async def memory(self) -> None:
        p = self.plan
        per_session: dict[str, list[float]] = by_target()
        for r in range(p.memory_rounds):
            for t in ordered(r):
                # A fresh process each round: memory freed by an earlier round would be
                # reused and hide the cost. Starting it blocks, but nothing else runs.
                proc = start_target(t, self.fake.http, self.logs)
                try:
                    for ws in await sc.open_sessions(proc.ws, 5):  # warm-up: a turn each
                        await ws.send(sc.user_message("tokens=5"))
                        await sc.read_until_complete(ws)
                        await ws.close()
                    await asyncio.sleep(0.5)
                    before = proc.rss_kib()
                    sockets = await sc.open_sessions(proc.ws, p.idle_sessions)
                    await asyncio.sleep(1.0)
                    after = proc.rss_kib()
                    await sc.close_sessions(sockets)
                finally:
                    proc.stop()
                per_session[t].append((after - before) / p.idle_sessions)
        svc, base = median(per_session["service"]), median(per_session["baseline"])
        self.report.raw["memory_kib_per_session"] = per_session
        figure = (
            f"KiB RSS per idle session ({p.idle_sessions} sessions, median of {p.memory_rounds})"
        )
        self.report.rows.append(
            Row("4 memory", figure, svc, base, compare=f"{svc / base:.2f}x" if base > 0 else "",
                goal="< 50 KiB", met=svc < 50)
        )  # fmt: skip

    async def cancel(self, client: httpx.AsyncClient) -> None:
        p = self.plan
        closed: dict[str, list[float]] = by_target("direct")
        acked: dict[str, list[float]] = by_target()
        sockets = {t: await sc.open_session(self.targets[t].ws) for t in TARGETS}
        try:
            for i in range(-1, p.cancels):  # round -1 warms up
                after = 3 + i % 8  # tokens received before cancelling
                for t in ordered(i):
                    run = await sc.ws_cancel(
                        sockets[t], client, f"{t}-{uuid.uuid4()}", after, p.cancel_rate
                    )
                    if i >= 0:
                        closed[t].append(run.closed_s * 1000)
                        acked[t].append((run.acked_s or 0.0) * 1000)
                run = await sc.direct_cancel(client, f"direct-{uuid.uuid4()}", after, p.cancel_rate)
                if i >= 0:
                    closed["direct"].append(run.closed_s * 1000)
        finally:
            await sc.close_sessions(list(sockets.values()))
        self.report.raw["cancel_ms"] = {"to_upstream_close": closed, "to_cancelled": acked}
        c50, c99 = ({t: sc.percentile(v, q) for t, v in closed.items()} for q in (50, 99))
        a50 = {t: sc.percentile(v, 50) for t, v in acked.items()}
        label = f"({p.cancels} cancels at {p.cancel_rate:g} tokens/s)"
        self.report.rows += [
            Row("5 cancel", f"p50 ms to upstream close {label}", c50["service"], c50["baseline"],
                compare=f"{c50['service'] - c50['baseline']:+.2f} ms", direct=c50["direct"],
                digits=2),
            Row("5 cancel", f"p99 ms to upstream close {label}", c99["service"], c99["baseline"],
                compare=f"{c99['service'] - c99['baseline']:+.2f} ms", direct=c99["direct"],
                goal="< 50 ms", met=c99["service"] < 50, digits=2),
            Row("5 cancel", "p50 ms to the `cancelled` frame", a50["service"], a50["baseline"],
                digits=2),
        ]  # fmt: skip


def render(report: Report) -> str:
    m = report.machine
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores ({m['cores_usable']} usable), "
        f"{m['memory_gib']} GiB, Linux {m['kernel']}, Python {m['python']}; {m['date']}; "
        f"load average {m['load_average']:.2f} at start, {m.get('load_average_end', 0):.2f} "
        "at end; load generator, fake Ollama and target on the same machine.",
        "",
        "| scenario | figure | service | baseline | ratio / diff | fake via httpx | goal | met |",
        "|---|---|---:|---:|---:|---:|---|---|",
    ]

    def num(value: float | None, digits: int) -> str:
        if value is None or value != value:
            return "-"
        return f"{value:,.{digits}f}"

    for row in report.rows:
        met = "" if row.met is None else ("yes" if row.met else "**no**")
        lines.append(
            f"| {row.scenario} | {row.figure} | {num(row.service, row.digits)} | "
            f"{num(row.baseline, row.digits)} | {row.compare} | "
            f"{num(row.direct, row.digits)} | {row.goal} | {met} |"
        )
    for failure in report.failures:
        lines.append(f"\nFAILED: {failure}")
    return "\n".join(lines)


def start_target(name: str, upstream: str, logs: Path) -> Proc:
    return (start_service if name == "service" else start_baseline)(upstream, logs)


async def run(plan: Plan, only: set[int], logs: Path) -> Report:
    main_task = asyncio.current_task()
    assert main_task is not None
    # SIGTERM (a CI timeout) cancels the run, so the processes and the logs are cleaned up.
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    fake = start_fake(logs)
    started: list[Proc] = [fake]
    try:
        suite = Suite(plan, fake, logs)
        async with httpx.AsyncClient(base_url=fake.http, timeout=httpx.Timeout(30.0)) as client:
            # Memory first, in its own fresh processes, before the others load the machine.
            if 4 in only:
                await _attempt(suite.report, 4, "memory", suite.memory)
            steps: list[tuple[int, str, Callable[[], Awaitable[None]]]] = [
                (1, "single stream", lambda: suite.single_stream(client)),
                (2, "first token", lambda: suite.first_token(client)),
                (5, "cancel", lambda: suite.cancel(client)),
                (3, "concurrency", suite.concurrency),
            ]
            steps = [step for step in steps if step[0] in only]
            try:
                for name in TARGETS if steps else ():
                    suite.targets[name] = start_target(name, fake.http, logs)
                    started.append(suite.targets[name])
            except RuntimeError as exc:
                suite.report.failures.append(f"starting the targets: {exc}")
                steps = []
            for number, name, step in steps:
                await _attempt(suite.report, number, name, step)
        suite.report.rows.sort(key=lambda row: row.scenario[0])
        suite.report.machine["load_average_end"] = os.getloadavg()[0]
        return suite.report
    finally:
        for proc in reversed(started):
            proc.stop()


async def _attempt(
    report: Report, number: int, name: str, step: Callable[[], Awaitable[None]]
) -> None:
    print(f"scenario {number}: {name} ...", flush=True)
    started = time.monotonic()
    try:
        await step()
    except Exception as exc:  # report it and go on with the other scenarios
        traceback.print_exc()
        report.failures.append(f"scenario {number} ({name}): {type(exc).__name__}: {exc}")
    print(f"scenario {number}: {name} took {time.monotonic() - started:.1f} s", flush=True)


def raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        limit = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts, for CI")
    parser.add_argument("--json", type=Path, help="save the results and raw samples here")
    parser.add_argument("--only", default="1,2,3,4,5", help="scenarios to run, e.g. 1,3")
    args = parser.parse_args()
    plan = QUICK if args.quick else Plan()
    only = {int(x) for x in args.only.split(",") if x.strip()}
    raise_fd_limit(2 * max(max(plan.levels), plan.idle_sessions) + 1024)
    with tempfile.TemporaryDirectory(prefix="fasttalk-bench-") as tmp:
        try:
            import uvloop
        except ImportError:
            runner = asyncio.run
        else:
            runner = uvloop.run
        try:
            report = runner(run(plan, only, Path(tmp)))
        except asyncio.CancelledError:
            print("stopped by SIGTERM", file=sys.stderr)
            sys.exit(143)
    print()
    print(render(report))
    if args.json:
        data = {
            "plan": asdict(plan),
            "machine": report.machine,
            "rows": [asdict(r) for r in report.rows],
            "raw": report.raw,
            "failures": report.failures,
        }
        args.json.write_text(json.dumps(data, indent=1, default=str))
    sys.exit(1 if report.failures else 0)


if __name__ == "__main__":
    main()
