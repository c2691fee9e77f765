"""What the scenario benchmarks share: their report, running the scenarios asked for, and their
command line.

Each benchmark (`engines.py`, `sessions.py`, `voice.py`) names its scenarios, its plans (full
and `--quick`), how to start a report and how to render it; `main` does the rest: `--quick`,
`--only`, `--logs`, uvloop where installed, SIGTERM stopping the run cleanly, a scenario that
fails reported and the others run, and a non-zero exit only when something failed to run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from processes import machine


@dataclass
class Row:
    """One figure of a report, beside its baseline, with its goal where it has one."""

    scenario: str
    figure: str
    measured: float | str | None
    baseline: float | str | None
    compare: str = ""
    goal: str = ""
    met: bool | None = None
    digits: int = 1


@dataclass
class Report:
    machine: dict[str, Any]
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    scenario: str = ""  # the one running, for the notes
    failures: list[str] = field(default_factory=list)


def render(report: Report, present: str, legend: str) -> str:
    """The machine, the table of rows, `legend` (what measured and baseline are), the notes
    and the failures; `present` names what ran on the machine besides the load generator."""
    m = report.machine
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores ({m['cores_usable']} usable), "
        f"{m['memory_gib']} GiB, Linux {m['kernel']}, Python {m['python']}; {m['date']}; "
        f"load average {m['load_average']:.2f} at start, {m.get('load_average_end', 0):.2f} "
        f"at end; load generator, {present} on the same machine.",
        "",
        "| scenario | figure | measured | baseline | ratio / diff | goal | met |",
        "|---|---|---:|---:|---:|---|---|",
    ]

    def num(value: float | str | None, digits: int) -> str:
        if isinstance(value, str):
            return value
        if value is None or value != value:
            return "-"
        return f"{value:,.{digits}f}"

    for row in report.rows:
        met = "" if row.met is None else ("yes" if row.met else "**no**")
        lines.append(
            f"| {row.scenario} | {row.figure} | {num(row.measured, row.digits)} | "
            f"{num(row.baseline, row.digits)} | {row.compare} | {row.goal} | {met} |"
        )
    lines += ["", legend]
    lines += [f"- {note}" for note in report.notes]
    lines += [f"\nFAILED: {failure}" for failure in report.failures]
    return "\n".join(lines)


class Reported(Protocol):
    machine: dict[str, Any]
    scenario: str  # the one running, for the notes
    failures: list[str]


P = TypeVar("P")
R = TypeVar("R", bound=Reported)
Step = Callable[[P, Path, R], Awaitable[None]]


async def run_scenarios(
    plan: P, only: set[str], logs: Path, report: R, steps: Mapping[str, Step[P, R]]
) -> R:
    main_task = asyncio.current_task()
    assert main_task is not None
    # SIGTERM (a CI timeout) cancels the run, so the processes are stopped and logs cleaned.
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    for name, step in steps.items():
        if name not in only:
            continue
        print(f"scenario {name}: {getattr(step, '__name__', name)} ...", flush=True)
        report.scenario = name
        started = time.monotonic()
        try:
            await step(plan, logs, report)
        except Exception as exc:  # report it and go on with the other scenarios
            traceback.print_exc()
            report.failures.append(f"scenario {name}: {type(exc).__name__}: {exc}")
        print(f"scenario {name}: took {time.monotonic() - started:.1f} s", flush=True)
    report.machine["load_average_end"] = machine()["load_average"]
    return report


def main(
    doc: str,
    steps: Mapping[str, Step[P, R]],
    plans: tuple[P, P],
    new_report: Callable[[], R],
    render: Callable[[R], str],
) -> None:
    """The command line: `plans` are the full plan and the `--quick` one."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts, for CI")
    names = ",".join(steps)
    parser.add_argument("--only", default=names, help=f"scenarios to run, of {names}")
    parser.add_argument("--logs", type=Path, help="keep the processes' logs in this folder")
    args = parser.parse_args()
    plan = plans[1] if args.quick else plans[0]
    only = {x.strip() for x in args.only.split(",") if x.strip()}
    runner: Callable[[Coroutine[Any, Any, R]], R]
    try:
        import uvloop
    except ImportError:
        runner = asyncio.run
    else:
        runner = uvloop.run
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        logs = args.logs or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ft-")))
        logs.mkdir(parents=True, exist_ok=True)
        try:
            report = runner(run_scenarios(plan, only, logs, new_report(), steps))
        except asyncio.CancelledError:
            print("stopped by SIGTERM", file=sys.stderr)
            sys.exit(143)
    print()
    print(render(report))
    print(f"\nwall time {time.monotonic() - started:.0f} s")
    sys.exit(1 if report.failures else 0)
