"""Turns for voice pipelines: what clause chunking costs the hot path, and how soon the first
clause of a real model's reply is ready for speech.

    .venv/bin/python bench/voice.py [--quick] [--only 1,2] [--logs DIR]

Everything runs on 127.0.0.1, each in its own process: the fast fake Ollama
(`fake_upstream.py`), the service (`python main.py websocket`) and this process, the load
generator. Each figure stands beside a baseline measured in the same run.

1. chunking cost: one service on the fake, one unpaced 3,000-token reply at a time (the fake's
   sentences are 9 words and a full stop: one clause piece holds 10 engine chunks), on fresh
   sessions with `chunking` "clause" and "none" (the baseline) in alternating order, median of
   9: engine tokens a second, and the service's CPU per engine token. Every clause reply is
   checked: its frames concatenate to the reply the fake sent, and `tokens_generated` counts
   the engine's chunks. Beside it, the chunker alone in this process (`Chunker.feed` over the
   same reply, token by token) against a loop that only collects the tokens.
2. first piece on the embedded engine: LLM_BACKEND=llamacpp with the packaged SmolLM2-135M
   (NUM_THREADS = the usable cores), the first 20 questions of `voice_questions.json`, each
   asked on a fresh session with `chunking` "clause" and again with "none", `seed` 1 and
   `max_tokens` 64: two passes over the list, the modes alternating, so no turn follows its
   own question and finds its whole prompt in the engine's cache. Every reply is checked: its
   frames concatenate to the reply `get_history` holds. Medians over the questions: the
   clause turns' `time_to_first_chunk_ms` beside their own `time_to_first_token_ms` (both
   from `response_complete`), and the first token frame as the client sees it, clause beside
   none (the two replies to a question mostly begin alike, but the engine's sampling is not
   bit-for-bit repeatable across its prompt cache, so they may part later).

`--quick` runs small counts in well under a minute, for CI. The exit status is non-zero only
when something failed to run; a missed goal is reported, not failed.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection

sys.path.insert(0, str(Path(__file__).resolve().parent))

import runner  # noqa: E402
import scenarios as sc  # noqa: E402
from fake_upstream import reply_text  # noqa: E402
from processes import (  # noqa: E402
    BENCH,
    Proc,
    log_problems,
    machine,
    start_fake,
    start_service_with,
)
from runner import Report, Row  # noqa: E402

from llm_service.chunking import Chunker  # noqa: E402

EXPECTED_WARNINGS = frozenset({"access_open"})  # no LLM_API_KEY on 127.0.0.1: as intended
MODES = ("clause", "none")  # measured, baseline
QUESTIONS = BENCH / "voice_questions.json"
COST_GOAL = 0.9  # clause throughput, at least this share of none's
COST_GOAL_US = 2.0  # and at most this much CPU per token more


@dataclass(frozen=True)
class Plan:
    """How much each scenario does."""

    stream_tokens: int = 3000
    stream_rounds: int = 9
    questions: int = 20
    max_tokens: int = 64


QUICK = Plan(stream_tokens=300, stream_rounds=3, questions=3, max_tokens=24)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def keep(stack: contextlib.ExitStack, proc: Proc, report: Report) -> Proc:
    """Stop `proc` when `stack` closes and note what its log says went wrong."""
    scenario = report.scenario

    def stop() -> None:
        proc.stop()
        report.notes.extend(f"{scenario}: {n}" for n in log_problems(proc, EXPECTED_WARNINGS))

    stack.callback(stop)
    return proc


async def voice_session(url: str, **config: Any) -> ClientConnection:
    """A session configured with `config` (its `session_configured` read)."""
    ws = await sc.open_session(url)
    await ws.send(orjson.dumps({"type": "start_session", "config": config}).decode())
    frame = orjson.loads(await ws.recv())
    if frame.get("type") != "session_configured":
        await ws.close()
        raise sc.BenchError(f"expected session_configured, got {frame}")
    return ws


@dataclass
class Reply:
    text: str
    frames: int
    first_frame_s: float  # from sending the message to the first token frame
    seconds: float  # to `response_complete`
    stats: dict[str, Any]


async def ask(ws: ClientConnection, text: str) -> Reply:
    """One turn: the reply's text, its frames and when they came, its stats."""
    parts: list[str] = []
    first = 0.0
    started = time.perf_counter()
    await ws.send(sc.user_message(text))
    while True:
        frame = orjson.loads(await ws.recv())
        kind = frame.get("type")
        if kind == "token":
            if not parts:
                first = time.perf_counter() - started
            parts.append(frame["data"])
        elif kind == "response_complete":
            elapsed = time.perf_counter() - started
            return Reply("".join(parts), len(parts), first, elapsed, frame["stats"])
        else:
            raise sc.BenchError(f"unexpected frame during a reply: {str(frame)[:300]}")


async def last_reply(ws: ClientConnection) -> str:
    """The latest assistant message, as `get_history` holds it."""
    await ws.send('{"type":"get_history"}')
    frame = orjson.loads(await ws.recv())
    if frame.get("type") != "history":
        raise sc.BenchError(f"expected history, got {str(frame)[:300]}")
    content: str = frame["messages"][-1]["content"]
    return content


def ordered(round_: int) -> tuple[str, ...]:
    return MODES if round_ % 2 == 0 else MODES[::-1]


# 1. Chunking cost ------------------------------------------------------------------------


async def chunking_cost(plan: Plan, logs: Path, report: Report) -> None:
    with contextlib.ExitStack() as stack:
        fake = keep(stack, start_fake(logs), report)
        service = keep(stack, start_service_with({"OLLAMA_BASE_URL": fake.http}, logs), report)
        expected = reply_text(plan.stream_tokens)
        rates: dict[str, list[float]] = {m: [] for m in MODES}
        cpu = dict.fromkeys(MODES, 0.0)
        frames: dict[str, int] = {}
        message = f"tokens={plan.stream_tokens} rate=0"
        for r in range(-1, plan.stream_rounds):  # round -1: a warm-up of each
            for mode in ordered(r):
                ws = await voice_session(service.ws, chunking=mode)
                try:
                    before = service.cpu_seconds()
                    reply = await ask(ws, message)
                    used = service.cpu_seconds() - before
                finally:
                    await ws.close()
                if reply.text != expected:
                    raise sc.BenchError(f"{mode}: the frames do not make the fake's reply")
                if reply.stats["tokens_generated"] != plan.stream_tokens:
                    raise sc.BenchError(f"{mode}: tokens_generated {reply.stats}")
                if r < 0:
                    continue
                rates[mode].append(plan.stream_tokens / reply.seconds)
                cpu[mode] += used
                frames[mode] = reply.frames
    got, base = median(rates["clause"]), median(rates["none"])
    tokens = plan.stream_tokens * plan.stream_rounds
    us = {m: cpu[m] / tokens * 1e6 for m in MODES}
    extra = us["clause"] - us["none"]
    alone, collect = chunker_alone(expected)
    figure = f"engine tokens/s, {plan.stream_tokens}-token reply (median of {plan.stream_rounds})"
    report.rows += [
        Row("1 chunking cost", figure, got, base, f"{got / base:.2f}x", f">= {COST_GOAL}x none",
            got >= COST_GOAL * base, digits=0),
        Row("1 chunking cost", "CPU us per engine token in the service", us["clause"],
            us["none"], f"{extra:+.2f} us", f"< +{COST_GOAL_US:g} us", extra < COST_GOAL_US,
            digits=2),
        Row("1 chunking cost", "token frames per reply", frames["clause"], frames["none"],
            digits=0),
        Row("1 chunking cost", "us per token in this process: Chunker.feed (baseline: "
            "collecting the tokens)", alone, collect, f"{alone - collect:+.2f} us",
            f"< +{COST_GOAL_US:g} us", alone - collect < COST_GOAL_US, digits=2),
    ]  # fmt: skip
    report.notes.append(
        "1: tokens/s per run, clause "
        + ", ".join(f"{x:,.0f}" for x in rates["clause"])
        + "; none "
        + ", ".join(f"{x:,.0f}" for x in rates["none"])
    )


def chunker_alone(text: str, repeats: int = 20) -> tuple[float, float]:
    """Microseconds per token: the clause chunker fed `text` word by word, and a loop that
    only collects the words (best of `repeats`)."""
    tokens = [" " + w for w in text.split(" ") if w]
    best_chunker = best_collect = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        chunker = Chunker("clause")
        pieces: list[str] = []
        for token in tokens:
            pieces += chunker.feed(token)
        pieces.append(chunker.flush())
        best_chunker = min(best_chunker, time.perf_counter() - started)
        started = time.perf_counter()
        kept: list[str] = []
        for token in tokens:
            kept.append(token)
        best_collect = min(best_collect, time.perf_counter() - started)
    if "".join(pieces) != "".join(tokens):
        raise sc.BenchError("the chunker lost text")
    return best_chunker / len(tokens) * 1e6, best_collect / len(tokens) * 1e6


# 2. First piece on the embedded engine ---------------------------------------------------


async def first_piece(plan: Plan, logs: Path, report: Report) -> None:
    questions = [q["question"] for q in json.loads(QUESTIONS.read_text())["questions"]]
    questions = questions[: plan.questions]
    threads = len(os.sched_getaffinity(0))
    env = {"LLM_BACKEND": "llamacpp", "NUM_THREADS": str(threads)}
    config = {"seed": 1, "max_tokens": plan.max_tokens}
    replies: dict[str, list[Reply]] = {m: [] for m in MODES}
    with contextlib.ExitStack() as stack:
        service = keep(stack, start_service_with(env, logs), report)
        for mode in MODES:  # warm-up: the first turn pays for loading the model
            ws = await voice_session(service.ws, chunking=mode, **config)
            with contextlib.suppress(Exception):
                await ask(ws, "Hello.")
            await ws.close()
        # Two passes over the questions, the modes alternating: the same question is never
        # asked twice in a row, so no turn finds its whole prompt in the engine's cache.
        for i, question in [*enumerate(questions), *enumerate(questions, 1)]:
            mode = MODES[i % 2]
            ws = await voice_session(service.ws, chunking=mode, **config)
            try:
                reply = await ask(ws, question)
                if await last_reply(ws) != reply.text:
                    raise sc.BenchError(f"{mode}: the frames differ from the stored reply")
                replies[mode].append(reply)
            finally:
                await ws.close()
    clause_turns = replies["clause"]
    ttfc = median([r.stats["time_to_first_chunk_ms"] for r in clause_turns])
    ttft = median([r.stats["time_to_first_token_ms"] for r in clause_turns])
    seen = {m: median([r.first_frame_s * 1000 for r in replies[m]]) for m in MODES}
    words = median([float(len(r.text.split())) for r in clause_turns])
    frames = median([float(r.frames) for r in clause_turns])
    label = f"median of {len(questions)} questions"
    report.rows += [
        Row("2 first piece", f"time_to_first_chunk_ms, clause (baseline: the same turns' "
            f"time_to_first_token_ms), {label}", ttfc, ttft, f"{ttfc - ttft:+.1f} ms"),
        Row("2 first piece", f"ms to the first token frame at the client, clause (baseline: "
            f"none), {label}", seen["clause"], seen["none"],
            f"{seen['clause'] - seen['none']:+.1f} ms"),
        Row("2 first piece", f"token frames per reply, clause ({label}; words per reply "
            f"{words:.0f})", frames, None, digits=0),
    ]  # fmt: skip
    report.notes.append(
        f"2: SmolLM2-135M on {threads} threads, seed 1, max_tokens {plan.max_tokens}; every "
        "reply's frames concatenate to the reply `get_history` holds"
    )
    first = clause_turns[0]
    report.notes.append(
        f"2: e.g. {questions[0]!r}: first piece after "
        f"{first.stats['time_to_first_chunk_ms']:.0f} ms "
        f"(first token {first.stats['time_to_first_token_ms']:.0f} ms), "
        f"{first.frames} frames: {first.text[:120]!r}"
    )


# The report ------------------------------------------------------------------------------


def render(report: Report) -> str:
    return runner.render(
        report,
        "fake, engine and service",
        "Measured: chunking clause; baseline: chunking none, unless the row says.",
    )


def main() -> None:
    steps = {"1": chunking_cost, "2": first_piece}
    runner.main(__doc__, steps, (Plan(), QUICK), lambda: Report(machine()), render)


if __name__ == "__main__":
    main()
