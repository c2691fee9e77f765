"""Tracing: what OpenTelemetry spans cost the hot path.

    .venv/bin/python bench/tracing.py [--quick] [--only 1] [--logs DIR]

Everything runs on 127.0.0.1, each in its own process: the fast fake Ollama
(`fake_upstream.py`), an OTLP/HTTP endpoint that parses and counts the spans it is sent
(`otlp_sink.py`), two services on the same fake (`python main.py websocket`), one with
OTEL_EXPORTER_OTLP_ENDPOINT set to the sink (tracing on) and one without (off: the baseline),
and this process, the load generator, driving the two alternately.

1. hot path: tokens a second of one unpaced 3,000-token reply (median of 9, a fresh session
   each) and the services' CPU per token; the first token of one-token replies (p50 and p99
   per block of 50 turns, median of 5 blocks), where a turn's four spans weigh most; then
   the spans the sink received, against the four per turn the traced service should send.

`--quick` runs small counts in well under a minute, for CI. The exit status is non-zero only
when something failed to run; a missed goal is reported, not failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

import runner  # noqa: E402
import scenarios as sc  # noqa: E402
from processes import Proc, machine, start_fake, start_otlp_sink, start_service_with  # noqa: E402
from runner import Report, Row  # noqa: E402

WAYS = ("on", "off")  # measured, baseline
SPANS_PER_TURN = 4  # turn, turn.queue, turn.upstream, turn.stream


@dataclass(frozen=True)
class Plan:
    stream_tokens: int = 3000
    stream_rounds: int = 9
    turns: int = 50
    turn_blocks: int = 5


QUICK = Plan(stream_tokens=300, stream_rounds=3, turns=10, turn_blocks=1)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def ordered(round_: int) -> tuple[str, ...]:
    return WAYS if round_ % 2 == 0 else WAYS[::-1]


async def hot_path(plan: Plan, logs: Path, report: Report) -> None:
    with contextlib.ExitStack() as stack:
        fake = start_fake(logs)
        stack.callback(fake.stop)
        sink = start_otlp_sink(logs)
        stack.callback(sink.stop)
        base = {"LLM_BACKEND": "ollama", "OLLAMA_BASE_URL": fake.http}
        services: dict[str, Proc] = {
            "on": start_service_with({**base, "OTEL_EXPORTER_OTLP_ENDPOINT": sink.http}, logs),
            "off": start_service_with(base, logs),
        }
        for proc in services.values():
            stack.callback(proc.stop)
        turns = await stream_rate(plan, services, report)
        turns += await first_token(plan, services, report)
        await spans_received(sink, turns, report)


async def stream_rate(plan: Plan, services: dict[str, Proc], report: Report) -> int:
    rates: dict[str, list[float]] = {w: [] for w in WAYS}
    cpu = dict.fromkeys(WAYS, 0.0)
    for way in WAYS:  # warm-up
        await sc.ws_stream(services[way].ws, plan.stream_tokens)
    for r in range(plan.stream_rounds):
        for way in ordered(r):
            proc = services[way]
            before = proc.cpu_seconds()
            run = await sc.ws_stream(proc.ws, plan.stream_tokens)
            rates[way].append(run.tokens_per_second)
            cpu[way] += proc.cpu_seconds() - before
    got, base = median(rates["on"]), median(rates["off"])
    tokens = plan.stream_tokens * plan.stream_rounds
    us = {w: cpu[w] / tokens * 1e6 for w in WAYS}
    figure = (
        f"tokens/s, {plan.stream_tokens}-token reply (median of {plan.stream_rounds}), "
        "tracing on (baseline: off)"
    )
    report.rows += [
        Row("1 hot path", figure, got, base, f"{got / base:.2f}x", ">= 0.9x off",
            got >= 0.9 * base, digits=0),
        Row("1 hot path", "CPU us per token in the service", us["on"], us["off"],
            f"{us['on'] / us['off']:.2f}x"),
    ]  # fmt: skip
    report.notes.append(
        "1: tokens/s per run, on "
        + ", ".join(f"{x:,.0f}" for x in rates["on"])
        + "; off "
        + ", ".join(f"{x:,.0f}" for x in rates["off"])
    )
    return plan.stream_rounds + 1


async def first_token(plan: Plan, services: dict[str, Proc], report: Report) -> int:
    found = await sc.alternated_first_tokens(
        [services[w].ws for w in WAYS], plan.turns, plan.turn_blocks
    )
    p50 = {w: f[0] for w, f in zip(WAYS, found, strict=True)}
    p99 = {w: f[1] for w, f in zip(WAYS, found, strict=True)}
    label = f"(median of {plan.turn_blocks} blocks of {plan.turns} turns)"
    d50, d99 = p50["on"] - p50["off"], p99["on"] - p99["off"]
    report.rows += [
        Row("1 hot path", f"first token p50 ms {label}", p50["on"], p50["off"],
            f"{d50:+.2f} ms", digits=2),
        Row("1 hot path", f"first token p99 ms {label}", p99["on"], p99["off"],
            f"{d99:+.2f} ms", digits=2),
    ]  # fmt: skip
    return plan.turn_blocks * (plan.turns + 1)


async def spans_received(sink: Proc, turns: int, report: Report) -> None:
    """The sink's count once the batch exporter has sent everything (it sends every 5 s)."""
    expected = turns * SPANS_PER_TURN
    deadline = time.monotonic() + 15
    async with httpx.AsyncClient(base_url=sink.http, timeout=5) as client:
        while True:
            counts = (await client.get("/spans")).json()
            got = sum(counts["spans"].values())
            if got >= expected or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
    report.rows.append(
        Row("1 hot path", "spans the collector received (baseline: 4 per turn)", got,
            expected, f"{got - expected:+d}", "= 4 per turn", got == expected, digits=0)
    )  # fmt: skip
    report.notes.append(f"1: spans by name: {counts['spans']}, in {counts['exports']} exports")


def render(report: Report) -> str:
    return runner.render(
        report,
        "the fake, the OTLP sink and both services",
        "1: measured with OTEL_EXPORTER_OTLP_ENDPOINT set (four spans a turn, exported in "
        "batches by the SDK's thread), baseline the same service without it.",
    )


def main() -> None:
    runner.main(__doc__, {"1": hot_path}, (Plan(), QUICK), lambda: Report(machine()), render)


if __name__ == "__main__":
    main()
