"""Where a target spends its time per token and per turn: py-spy on the service and the baseline.

    .venv/bin/python bench/profile.py [--seconds 10] [--sessions 200] [--out DIR]

Starts the fake Ollama, the service and the baseline relay (as `suite.py` does), then for each
target and each load runs `py-spy record -r 500 -f raw` on the target process while the load
runs: `stream` is back-to-back unpaced 3,000-token replies (scenario 1), `concurrency-N` is N
sessions at 20 tokens a second (scenario 3), `turns` is one-token turns back to back on one
session (scenario 2). It prints, per target and load, the target's CPU time per token or turn
(py-spy attached adds a little) and the top frames: self time by package and by function, and
the time spent in or below each line of the target's own code. The raw profiles (collapsed
stacks, for flame graphs) are kept in `--out`."""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import scenarios as sc  # noqa: E402
from processes import ROOT, Proc, start_baseline, start_fake, start_service  # noqa: E402

PY_SPY = Path(sys.executable).parent / "py-spy"
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]+)(?::\d+)?\)$")


def package(path: str) -> str:
    """A short name for where a frame's code lives."""
    if "site-packages/" in path:
        return path.split("site-packages/", 1)[1].split("/", 1)[0].removesuffix(".py")
    if str(ROOT) in path or path.startswith(("llm_service", "bench")):
        rel = path.split(str(ROOT) + "/", 1)[-1]
        return rel.removesuffix(".py")
    stdlib = re.search(r"python3\.\d+/(.+?)(?:/|\.py)", path)
    return f"stdlib {stdlib.group(1)}" if stdlib else path


def parse_frame(frame: str) -> tuple[str, str]:
    match = _FRAME.match(frame.strip())
    return (match["func"], match["file"]) if match else (frame.strip(), "?")


def summarize(raw: Path, top: int) -> str:
    """Self time by package and by function, and time in or below each line of the
    target's own code (its innermost frame on the stack)."""
    by_package: Counter[str] = Counter()
    by_function: Counter[str] = Counter()
    own_lines: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [f for f in stack.split(";") if f and not f.startswith("process ")]
        if not frames:
            by_package["(no Python frame)"] += count
            continue
        func, file = parse_frame(frames[-1])
        by_package[package(file)] += count
        by_function[f"{func} ({package(file)})"] += count
        own = next(
            (
                f
                for f in reversed(frames)
                if "llm_service/" in f or "bench" in f or "baseline_relay" in f
            ),
            None,
        )
        own_lines[own or "(outside the target's code: event loop, server, callbacks)"] += count

    def table(title: str, counts: Counter[str]) -> list[str]:
        rows = [f"  {title}"]
        rows += [f"    {100 * n / total:5.1f}%  {name}" for name, n in counts.most_common(top)]
        return rows

    lines = [f"  {total} samples"]
    lines += table("self time by package", by_package)
    lines += table("self time by function", by_function)
    lines += table("time in or below each line of the target's own code", own_lines)
    return "\n".join(lines)


async def stream_load(proc: Proc, seconds: float) -> int:
    deadline = time.monotonic() + seconds
    tokens = 0
    while time.monotonic() < deadline:
        tokens += (await sc.ws_stream(proc.ws, 3000)).tokens
    return tokens


async def concurrency_load(proc: Proc, seconds: float, sessions: int) -> int:
    level = await sc.run_level(proc.ws, sessions, int(20 * seconds), 20.0)
    print(f"    completed {level.completed}/{sessions}, p99 gap {level.p99_gap_ms:.1f} ms")
    return level.completed * int(20 * seconds)


async def turns_load(proc: Proc, seconds: float) -> int:
    """One-token turns back to back on one session: the per-turn work of scenario 2."""
    ws = await sc.open_session(proc.ws)
    turns = 0
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            await sc.ws_first_token(ws)
            turns += 1
    finally:
        await ws.close()
    return turns


async def profile(
    proc: Proc, name: str, load: Callable[[], Awaitable[int]], seconds: float, out: Path, top: int
) -> None:
    raw = out / f"{proc.name}-{name}.txt"
    argv = ["record", "-r", "500", "-d", str(int(seconds) + 1), "-f", "raw", "-o", str(raw)]
    spy = await asyncio.create_subprocess_exec(
        str(PY_SPY),
        *argv,
        "-p",
        str(proc.pid),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    await asyncio.sleep(0.5)  # py-spy attaching
    before = proc.cpu_seconds()
    count = await load()
    cpu = proc.cpu_seconds() - before
    _, err = await asyncio.wait_for(spy.communicate(), 60)
    unit = "turn" if name == "turns" else "token"
    print(
        f"\n== {proc.name}, {name}: {count} {unit}s, target CPU {cpu:.2f} s, "
        f"{cpu / max(count, 1) * 1e6:.1f} us per {unit} (py-spy attached)"
    )
    if spy.returncode != 0 or not raw.exists():
        print(f"  py-spy failed: {err.decode(errors='replace')[-500:]}")
        return
    print(summarize(raw, top))


async def main_async(args: argparse.Namespace, logs: Path) -> None:
    out: Path = args.out
    fake = start_fake(logs)
    procs = [fake]
    try:
        procs.append(start_service(fake.http, logs))
        procs.append(start_baseline(fake.http, logs))
        for proc in procs[1:]:
            await sc.ws_stream(proc.ws, 300)  # warm-up
            loads: list[tuple[str, Callable[[], Awaitable[int]]]] = [
                ("stream", partial(stream_load, proc, args.seconds)),
                (f"concurrency-{args.sessions}",
                 partial(concurrency_load, proc, args.seconds, args.sessions)),
                ("turns", partial(turns_load, proc, args.seconds)),
            ]  # fmt: skip
            for name, load in loads:
                await profile(proc, name, load, args.seconds, out, args.top)
    finally:
        for proc in reversed(procs):
            proc.stop()
    print(f"\nraw profiles in {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--sessions", type=int, default=200)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "fasttalk-prof")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fasttalk-prof-") as logs:
        asyncio.run(main_async(args, Path(logs)))


if __name__ == "__main__":
    main()
