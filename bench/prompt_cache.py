"""The embedded engine's prompt cache: time to first token when sessions take turns, when the
context window is full, and the memory the cache holds.

    .venv/bin/python bench/prompt_cache.py [--quick] [--logs DIR]

LLM_BACKEND=llamacpp with the packaged SmolLM2-135M (one worker, NUM_THREADS = the usable
cores), `python main.py websocket`, driven by this process over 127.0.0.1; every figure is
from `response_complete`'s `time_to_first_token_ms`, temperature 0, `max_tokens` 16. Each
scenario runs twice in one run: with the cache (LLAMACPP_CACHE_BYTES, default 256 MiB) and
with it off (0), the behaviour before it.

1. sessions taking turns: sessions whose system prompts are ~1,000 tokens (and differ from
   their first words) ask 8 questions; one session alone (the baseline), then 4 taking turns
   round-robin. Median first token of turns 2-8.
2. a full window: DEFAULT_CONTEXT_WINDOW=1200, a ~300-token system prompt, 20 turns of
   ~60-token questions; median first token of the turns before the window first filled
   (the baseline) and of those after.
3. memory: RSS of the service before the sessions of (1) and after its 4 sessions were
   cached, and after 50 sessions each with a ~1,000-token prompt (the cache's bound is set to
   64 MiB for that, about 2.5 of those sessions, to show that it holds).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

import scenarios as sc  # noqa: E402
from processes import Proc, machine, start_service_with  # noqa: E402

MIB = 2**20


def system_prompt(n: int, facts: int) -> str:
    lines = [f"Fact {i}: river {n}-{i} flows into lake {(i * 7 + n) % 13}." for i in range(facts)]
    return f"You are assistant number {n}. Keep answers short. " + " ".join(lines)


async def session(url: str, prompt: str) -> Any:
    ws = await sc.open_session(url)
    config = {"system_prompt": prompt, "temperature": 0.0, "seed": 1, "max_tokens": 16}
    await ws.send(orjson.dumps({"type": "start_session", "config": config}).decode())
    frame = orjson.loads(await ws.recv())
    if frame.get("type") != "session_configured":
        raise sc.BenchError(f"expected session_configured, got {frame}")
    return ws


async def ask(ws: Any, text: str) -> dict[str, Any]:
    await ws.send(sc.user_message(text))
    while True:
        frame = orjson.loads(await ws.recv())
        if frame["type"] == "response_complete":
            stats: dict[str, Any] = frame["stats"]
            return stats
        if frame["type"] != "token":
            raise sc.BenchError(f"unexpected frame: {str(frame)[:300]}")


def start(logs: Path, cache_bytes: int, **env: str) -> Proc:
    threads = str(len(os.sched_getaffinity(0)))
    settings = {"LLM_BACKEND": "llamacpp", "NUM_THREADS": threads, **env}
    return start_service_with({**settings, "LLAMACPP_CACHE_BYTES": str(cache_bytes)}, logs)


async def taking_turns(url: str, sessions: int, turns: int, facts: int) -> list[float]:
    """First-token ms of turns 2.. of `sessions` sessions asking round-robin."""
    sockets = [await session(url, system_prompt(n, facts)) for n in range(sessions)]
    times: list[float] = []
    try:
        for t in range(turns):
            for ws in sockets:
                stats = await ask(ws, f"Question {t}: which lake does river {t} flow into?")
                if t:
                    times.append(stats["time_to_first_token_ms"])
    finally:
        await sc.close_sessions(sockets)
    return times


async def full_window(url: str, turns: int) -> tuple[list[float], list[float]]:
    ws = await session(url, system_prompt(0, 18))
    before: list[float] = []
    after: list[float] = []
    filled = False
    try:
        for t in range(turns):
            text = f"Question {t}: " + " ".join(f"word{t}-{i}" for i in range(30)) + "?"
            stats = await ask(ws, text)
            filled = filled or stats["history_trimmed_turns"] > 0
            if t:
                (after if filled else before).append(stats["time_to_first_token_ms"])
    finally:
        await ws.close()
    return before, after


async def run(quick: bool, logs: Path) -> list[str]:
    turns, facts = (3, 40) if quick else (8, 110)
    rows = []
    memory: dict[str, float] = {}
    for label, cache in (("cache", 256 * MIB), ("off", 0)):
        service = start(logs, cache)
        try:
            rss0 = service.rss_kib() / 1024
            alone = statistics.median(await taking_turns(service.ws, 1, turns, facts))
            four = statistics.median(await taking_turns(service.ws, 4, turns, facts))
            memory[label] = service.rss_kib() / 1024 - rss0
        finally:
            service.stop()
        rows.append(
            f"| 1 taking turns | {label} | median first token ms, turns 2-{turns}: 4 sessions "
            f"| {four:,.0f} | alone {alone:,.0f} | {four / alone:.2f}x | <= 1.5x |"
        )
        service = start(logs, cache, DEFAULT_CONTEXT_WINDOW="1200", DEFAULT_MAX_TOKENS="16")
        try:
            before, after = await full_window(service.ws, 6 if quick else 20)
        finally:
            service.stop()
        if before and after:
            b, a = statistics.median(before), statistics.median(after)
            rows.append(
                f"| 2 full window | {label} | median first token ms after the window filled "
                f"({len(after)} turns) | {a:,.0f} | before ({len(before)}) {b:,.0f} | "
                f"{a / b:.2f}x | <= 1.5x |"
            )
    rows.append(
        f"| 3 memory | cache | RSS MiB added by the 4 sessions of 1 (cache off: "
        f"{memory['off']:.0f}) | {memory['cache']:.0f} | bound 256 | | |"
    )
    service = start(logs, 64 * MIB)
    try:
        rss0 = service.rss_kib() / 1024
        await taking_turns(service.ws, 5 if quick else 50, 1 + 1, facts)
        grown = service.rss_kib() / 1024 - rss0
    finally:
        service.stop()
    rows.append(
        f"| 3 memory | cache 64 MiB | RSS MiB added by {5 if quick else 50} sessions, two "
        f"turns each | {grown:.0f} | bound 64 | | |"
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts, for CI")
    parser.add_argument("--logs", type=Path, help="keep the processes' logs in this folder")
    args = parser.parse_args()
    started = time.monotonic()
    m = machine()
    with contextlib.ExitStack() as stack:
        logs = args.logs or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ft-")))
        rows = asyncio.run(run(args.quick, logs))
    print(
        f"Machine: {m['cpu']}, {m['cores_usable']} usable cores, {m['memory_gib']} GiB, "
        f"Python {m['python']}; {m['date']}; load average {m['load_average']:.2f} at start."
    )
    print()
    print("| scenario | LLAMACPP_CACHE_BYTES | figure | measured | baseline | ratio | goal |")
    print("|---|---|---|---:|---:|---:|---|")
    print("\n".join(rows))
    print(f"\nwall time {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
