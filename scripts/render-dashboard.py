"""Render docs/dashboard.png: the Grafana dashboard's panels, drawn from a real Prometheus that
scraped the service under real traffic.

Grafana is not installable here (not in Debian, not on PyPI), so this draws what it would show.
The service (`python main.py websocket`, a process of its own) runs in front of two fake
Ollamas (tests/fakes/ollama.py) as a pool; clients drive it for about a minute: sessions come
and go, turns stream, some are cancelled, one session calls a tool, some replies fail, the
second engine fails for a while (its circuit opens, its turns are retried on the first), and a
burst of connections goes past LLM_MAX_CONNECTIONS. Debian's Prometheus scrapes /metrics every
second; every target of deploy/grafana/dashboards/fasttalk.json is evaluated over the run
(`/api/v1/query_range`) and drawn as inline SVG in the dashboard's grid, with its titles,
legends, units and value mappings; Debian's Chromium screenshots the page.

    .venv/bin/python scripts/render-dashboard.py [--seconds 60] [--out docs/dashboard.png]

Needs `prometheus` and `chromium` (apt-get install prometheus chromium) and the dev
requirements (playwright drives the Chromium; nothing downloads a browser).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import html
import json
import math
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import websockets  # noqa: E402
import yaml  # noqa: E402
from aiohttp import web  # noqa: E402
from playwright.async_api import async_playwright  # noqa: E402

from tests.browser import CHROMIUM, CHROMIUM_ARGS  # noqa: E402
from tests.fakes.ollama import ChatRecord, FakeOllama, Reply, fake_token_count  # noqa: E402
from tests.process import free_port, service_process  # noqa: E402
from tests.support import Client  # noqa: E402

DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "fasttalk.json"
JOB = "fasttalk-llm"
RATE_INTERVAL = "10s"  # what Grafana's $__rate_interval comes to at this scrape interval
MAX_CONNECTIONS = 12
REPLY_TEXT = (
    "Lisbon is the capital of Portugal , built on seven hills above the Tagus . "
    "Its trams climb narrow streets , and the light on the river is famous . "
    "Porto , to the north , is known for its bridges and its wine ."
)
WORDS = REPLY_TEXT.split()


# --- the engines: fake Ollamas with a prompt cache and a tool ---


class Engine(FakeOllama):
    """A fake Ollama that answers with varied timing, says how much of each prompt its
    cache held (all but the newest message, as a real prefix cache would after the first
    turn), calls `get_time` when a session offers tools, and fails while `failing`."""

    def __init__(self, rng: random.Random) -> None:
        super().__init__()
        self.rng = rng
        self.failing = False
        self.slow = 1.0

    def next_reply(self) -> Reply:
        rng = self.rng
        if self.failing:
            return Reply(status=500, error="CUDA error: out of memory")
        count = rng.randint(8, 30)
        start = rng.randrange(len(WORDS))
        chunks = [" " + WORDS[(start + i) % len(WORDS)] for i in range(count)]
        reply = Reply(
            chunks=chunks,
            first_delay=rng.uniform(0.08, 0.35) * self.slow,
            delay=rng.uniform(0.015, 0.05) * self.slow,
        )
        roll = rng.random()
        if roll < 0.04:
            reply.error_after = rng.randint(2, 6)
            reply.error = "llama runner process has terminated"
        elif roll < 0.08:
            reply = Reply(status=503, error="server busy, please try again")
        return reply

    async def _answer(
        self, request: web.Request, record: ChatRecord, reply: Reply
    ) -> web.StreamResponse:
        reply = self.next_reply()
        if record.body.get("tools") and record.messages[-1].get("role") == "user":
            call = {"function": {"name": "get_time", "arguments": {"city": "Lisbon"}}}
            reply = Reply(chunks=["Let me", " check."], first_delay=0.1, tool_calls=[call])
        return await super()._answer(request, record, reply)

    @staticmethod
    def _counters(reply: Reply, messages: list[dict[str, Any]]) -> dict[str, Any]:
        counts = FakeOllama._counters(reply, messages)
        if len(messages) > 2 and "prompt_eval_count" in counts:
            cached = counts["prompt_eval_count"] - fake_token_count(messages[-1:])
            counts["prompt_eval_cached_count"] = max(cached, 0)
        return counts


# --- the traffic ---

CLOCK = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The current time in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
QUESTIONS = [
    "Tell me about Lisbon.",
    "And Porto?",
    "What should I eat there?",
    "How do I get from one to the other?",
    "Which is older?",
    "Say that again, shorter.",
]


@dataclass
class Tally:
    frames: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str) -> None:
        self.frames[kind] = self.frames.get(kind, 0) + 1


async def connect(url: str) -> Client:
    ws = await websockets.connect(url, compression=None, open_timeout=5)
    return Client(ws)


async def conversation(
    url: str, until: float, rng: random.Random, tally: Tally, config: dict[str, Any]
) -> None:
    """One client: a session of turns with pauses between them, cancelling some replies
    and now and then sending a frame the service refuses; reconnects for a new session
    after a few turns."""
    while time.monotonic() < until:
        client = await connect(url)
        try:
            first = await client.recv()
            tally.add(first["type"])
            refused = first["type"] != "session_started"  # max_connections: try again later
            if config and not refused:
                await client.send({"type": "start_session", "config": config})
                tally.add((await client.recv())["type"])
            for _ in range(0 if refused else rng.randint(3, 8)):
                if time.monotonic() >= until:
                    break
                await turn(client, rng, tally)
                await asyncio.sleep(rng.uniform(0.3, 2.0))
        finally:
            await client.close()
        await asyncio.sleep(rng.uniform(0.2, 1.5))


async def turn(client: Client, rng: random.Random, tally: Tally) -> None:
    roll = rng.random()
    if roll < 0.04:
        await client.send({"type": "user_mesage", "text": "typo"})
        tally.add((await client.recv())["type"])
        return
    await client.send({"type": "user_message", "text": rng.choice(QUESTIONS)})
    cancel_after = rng.randint(2, 6) if roll < 0.2 else None
    tokens, cancelling = 0, False
    while True:
        frame = await client.recv(limit=30)
        kind = frame["type"]
        tally.add(kind)
        if kind == "token":
            tokens += 1
            if tokens == cancel_after:
                await client.send({"type": "cancel"})
                cancelling = True
        elif kind == "tool_call":
            results = [{"id": c["id"], "content": "12:00"} for c in frame["calls"]]
            await client.send({"type": "tool_result", "results": results})
        elif kind == "response_complete" and frame["stats"].get("done_reason") == "tool_calls":
            continue
        elif kind == "cancelled":
            return
        elif kind in {"response_complete", "error"}:
            if cancelling:  # the reply ended before the cancel was read: its answer follows
                tally.add((await client.recv_until("cancelled", limit=30))[-1]["type"])
            return


async def burst(url: str, count: int, hold: float, tally: Tally) -> None:
    """`count` connections at once, held for `hold` seconds: those past the limit are
    refused."""
    clients = await asyncio.gather(*(connect(url) for _ in range(count)))
    for client in clients:
        tally.add((await client.recv())["type"])
    await asyncio.sleep(hold)
    for client in clients:
        await client.close()


async def traffic(url: str, health: str, engines: list[Engine], seconds: float, seed: int) -> Tally:
    """About `seconds` of traffic: clients join over the first third, the engines slow down
    for a while, the second one fails and later crashes, a burst passes the connection
    limit, clients leave towards the end."""
    rng = random.Random(seed)
    tally = Tally()
    start = time.monotonic()
    end = start + seconds
    configs: list[dict[str, Any]] = [
        {},
        {},
        {"chunking": "clause"},
        {},
        {"tools": [CLOCK]},
        {"chunking": "sentence"},
        {},
        {},
    ]

    async def later(delay: float, job: Callable[[], Any]) -> None:
        await asyncio.sleep(delay)
        await job()

    async def failing(delay: float, length: float) -> None:
        """The second engine answers its probes but fails every chat (out of GPU memory):
        its circuit opens, and its sessions' turns are retried on the first."""
        await asyncio.sleep(delay)
        engines[1].failing = True
        await asyncio.sleep(length)
        engines[1].failing = False

    async def crashed(delay: float, length: float) -> None:
        """The second engine gone: connections refused, probes and all, until it is back."""
        await asyncio.sleep(delay)
        await engines[1].refuse()
        await asyncio.sleep(length)
        await engines[1].accept()

    async def health_checks() -> None:
        """/health every 5 s, as Docker's HEALTHCHECK does in the compose files."""
        async with httpx.AsyncClient(timeout=3.0) as client:
            while time.monotonic() < end:
                await client.get(health)
                await asyncio.sleep(5)

    async def slow(delay: float, length: float) -> None:
        await asyncio.sleep(delay)
        for engine in engines:
            engine.slow = 3.0
        await asyncio.sleep(length)
        for engine in engines:
            engine.slow = 1.0

    jobs = []
    for index, config in enumerate(configs):
        join = seconds * 0.3 * index / len(configs)
        leave = end - rng.uniform(0, seconds * 0.15)
        child = random.Random(rng.random())

        def run(
            config: dict[str, Any] = config, leave: float = leave, child: random.Random = child
        ) -> Any:
            return conversation(url, leave, child, tally, config)

        jobs.append(later(join, run))
    jobs.append(slow(seconds * 0.2, seconds * 0.1))
    jobs.append(failing(seconds * 0.38, seconds * 0.2))
    # Two bursts: rate() sees only the second, since a labelled counter's series (here
    # reason="max_connections") starts at its first count, with no zero before it.
    jobs.append(later(seconds * 0.5, lambda: burst(url, MAX_CONNECTIONS, 3.0, tally)))
    jobs.append(later(seconds * 0.62, lambda: burst(url, MAX_CONNECTIONS, 4.0, tally)))
    jobs.append(crashed(seconds * 0.72, seconds * 0.14))
    jobs.append(health_checks())
    async with asyncio.timeout(seconds + 60):
        await asyncio.gather(*jobs)
    return tally


# --- Prometheus ---


@contextlib.asynccontextmanager
async def prometheus(binary: str, workdir: Path, target: str) -> AsyncIterator[str]:
    """Prometheus on a free 127.0.0.1 port scraping `target` every second; yields its URL."""
    port = free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": [target]}]}],
    }
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = (workdir / "prometheus.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        binary,
        f"--config.file={workdir / 'prometheus.yml'}",
        f"--storage.tsdb.path={workdir / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(timeout=2.0) as client, asyncio.timeout(30):
            while True:
                if proc.returncode is not None:
                    raise RuntimeError((workdir / "prometheus.log").read_text())
                with contextlib.suppress(httpx.TransportError):
                    if (await client.get(url + "/-/ready")).status_code == 200:
                        break
                await asyncio.sleep(0.2)
        yield url
    finally:
        if proc.returncode is None:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 15)
        log.close()


@dataclass
class Series:
    name: str
    points: list[tuple[float, float]]  # (unix time, value); NaN where Prometheus had none


async def query_range(
    client: httpx.AsyncClient, url: str, expr: str, start: float, end: float, step: float
) -> list[dict[str, Any]]:
    params: dict[str, str | float] = {"query": expr, "start": start, "end": end, "step": step}
    body = (await client.get(url + "/api/v1/query_range", params=params)).json()
    if body.get("status") != "success":
        raise RuntimeError(f"{expr}: {body}")
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def legend(template: str, labels: dict[str, str]) -> str:
    text = template
    for key, value in labels.items():
        text = text.replace("{{" + key + "}}", value)
    return text


async def panel_data(
    client: httpx.AsyncClient, url: str, panel: dict[str, Any], start: float, end: float
) -> list[Series]:
    found: list[Series] = []
    for target in panel["targets"]:
        expr = target["expr"].replace("$__rate_interval", RATE_INTERVAL)
        for result in await query_range(client, url, expr, start, end, 1.0):
            points = [(float(t), float(v)) for t, v in result["values"]]
            found.append(Series(legend(target.get("legendFormat", ""), result["metric"]), points))
    return found


# --- drawing ---

PALETTE = [
    "#73BF69", "#F2CC0C", "#8AB8FF", "#FF780A", "#F2495C", "#5794F2", "#B877D9", "#705DA0",
    "#37872D", "#FADE2A", "#447EBC", "#C15C17", "#890F02", "#0A437C", "#6D1F62", "#584477",
]  # fmt: skip
NAMED_COLORS = {"green": "#73BF69", "red": "#F2495C", "yellow": "#FADE2A", "text": "#ccccdc"}
GRID_UNIT, GRID_GAP, WIDTH = 30, 8, 1680
PAD_LEFT, PAD_BOTTOM, PAD_TOP, PAD_RIGHT = 56, 20, 8, 12


def fmt(value: float, unit: str, decimals: int | None = None) -> str:
    if math.isnan(value):
        return "-"
    if unit == "percentunit":
        return f"{value * 100:.0f}%"
    if unit == "s":
        if value == 0:
            return "0 s"
        if value < 0.001:
            return f"{value * 1e6:.0f} µs"
        if value < 1:
            return f"{value * 1000:.3g} ms"
        return f"{value:.3g} s"
    suffix = unit.removeprefix("suffix:") if unit.startswith("suffix:") else ""
    if decimals == 0 or (value == int(value) and abs(value) < 1000):
        number = f"{value:.0f}"
    elif abs(value) >= 1000:
        number = f"{value / 1000:.3g}K"
    else:
        number = f"{value:.3g}"
    return number + suffix


def nice_max(top: float) -> tuple[float, float]:
    """An axis top at or above `top`, and its tick step."""
    if top <= 0 or math.isnan(top):
        return 1.0, 0.25
    raw = top / 4
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    return step * math.ceil(top / step - 1e-9), step


def color_of(panel: dict[str, Any], name: str, index: int) -> tuple[str, bool, float | None]:
    """A series' colour, whether it is dashed, and its fill opacity, from the overrides."""
    color, dashed, fill = PALETTE[index % len(PALETTE)], False, None
    for override in panel["fieldConfig"].get("overrides", []):
        matcher = override["matcher"]
        if matcher["id"] == "byRegexp":
            if not re.fullmatch(matcher["options"], name):
                continue
        elif matcher["id"] != "byName" or matcher["options"] != name:
            continue
        for prop in override["properties"]:
            if prop["id"] == "color":
                color = NAMED_COLORS.get(prop["value"]["fixedColor"], prop["value"]["fixedColor"])
            elif prop["id"] == "custom.lineStyle":
                dashed = prop["value"].get("fill") == "dash"
            elif prop["id"] == "custom.fillOpacity":
                fill = float(prop["value"])
    return color, dashed, fill


def time_ticks(start: float, end: float, pixels: float) -> list[float]:
    """Round times between `start` and `end`, at least 64 pixels apart."""
    span = end - start
    step = next((s for s in (5, 10, 15, 30, 60, 120, 300) if pixels * s / span >= 64), 600)
    first = math.ceil(start / step) * step
    return [first + i * step for i in range(int((end - first) // step) + 1)]


def legend_rows(names: list[str], width: float) -> int:
    rows, used = 1, 0.0
    for name in names:
        item = 22 + 6.6 * len(name) + 14
        if used and used + item > width:
            rows, used = rows + 1, 0.0
        used += item
    return rows


def legend_html(items: list[tuple[str, str, bool]]) -> str:
    spans = []
    for name, color, dashed in items:
        style = "dashed" if dashed else "solid"
        spans.append(
            f'<span class="item"><i style="border-top:3px {style} {color}"></i>'
            f"{html.escape(name)}</span>"
        )
    return '<div class="legend">' + "".join(spans) + "</div>"


def x_axis(start: float, end: float, x0: float, x1: float, y: float) -> tuple[list[str], Any]:
    def xpos(t: float) -> float:
        return x0 + (t - start) / (end - start) * (x1 - x0)

    parts = []
    for tick in time_ticks(start, end, x1 - x0):
        if not x0 + 24 <= xpos(tick) <= x1 - 24:  # a label cut by the edge
            continue
        label = time.strftime("%H:%M:%S", time.localtime(tick))
        parts.append(
            f'<text x="{xpos(tick):.1f}" y="{y + 14:.1f}" class="tick" '
            f'text-anchor="middle">{label}</text>'
        )
    return parts, xpos


def timeseries_svg(
    panel: dict[str, Any], series: list[Series], start: float, end: float, w: float, h: float
) -> tuple[str, list[tuple[str, str, bool]]]:
    defaults = panel["fieldConfig"]["defaults"]
    unit, decimals = defaults.get("unit", "short"), defaults.get("decimals")
    finite = [v for s in series for _, v in s.points if math.isfinite(v)]
    top: float
    step: float
    if defaults.get("max") is None:
        top, step = nice_max(max(finite, default=0.0) * 1.05)
    else:
        top = float(defaults["max"])
        step = top / 4
    x0, x1, y0, y1 = PAD_LEFT, w - PAD_RIGHT, PAD_TOP, h - PAD_BOTTOM
    parts, xpos = x_axis(start, end, x0, x1, y1)

    def ypos(v: float) -> float:
        return y1 - min(max(v, 0.0), top) / top * (y1 - y0)

    for i in range(int(round(top / step)) + 1):
        v = i * step
        y = ypos(v)
        parts.append(f'<line x1="{x0}" x2="{x1}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>')
        parts.append(
            f'<text x="{x0 - 6}" y="{y + 4:.1f}" class="tick" text-anchor="end">'
            f"{html.escape(fmt(v, unit, decimals))}</text>"
        )
    base_fill = defaults.get("custom", {}).get("fillOpacity", 0) / 100
    items = []
    for index, s in enumerate(series):
        color, dashed, fill = color_of(panel, s.name, index)
        opacity = base_fill if fill is None else fill / 100
        runs: list[list[tuple[float, float]]] = [[]]
        for t, v in s.points:
            if math.isfinite(v):
                runs[-1].append((xpos(t), ypos(v)))
            elif runs[-1]:
                runs.append([])
        for run in runs:
            if not run:
                continue
            line = " ".join(f"{x:.1f},{y:.1f}" for x, y in run)
            if opacity and len(run) > 1:
                area = f"{run[0][0]:.1f},{y1:.1f} {line} {run[-1][0]:.1f},{y1:.1f}"
                parts.append(f'<polygon points="{area}" fill="{color}" opacity="{opacity}"/>')
            dash = ' stroke-dasharray="8 6"' if dashed else ""
            if len(run) == 1:
                x, y = run[0]
                parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="1.5" fill="{color}"/>')
            parts.append(
                f'<polyline points="{line}" fill="none" stroke="{color}" stroke-width="1.5"{dash}/>'
            )
        items.append((s.name, color, dashed))
    if not series:
        parts.append(
            f'<text x="{(x0 + x1) / 2}" y="{(y0 + y1) / 2}" class="empty" '
            'text-anchor="middle">No data</text>'
        )
    return f'<svg width="{w:.0f}" height="{h:.0f}">{"".join(parts)}</svg>', items


def state_svg(
    panel: dict[str, Any], series: list[Series], start: float, end: float, w: float, h: float
) -> tuple[str, list[tuple[str, str, bool]]]:
    mapping = panel["fieldConfig"]["defaults"]["mappings"][0]["options"]
    states = {
        float(k): (v["text"], NAMED_COLORS.get(v["color"], v["color"])) for k, v in mapping.items()
    }
    label_width = min(w * 0.38, 14 + 6.0 * max((len(s.name) for s in series), default=4))
    x0, x1, y0, y1 = label_width, w - PAD_RIGHT, PAD_TOP, h - PAD_BOTTOM
    parts, xpos = x_axis(start, end, x0, x1, y1)
    row = (y1 - y0) / max(len(series), 1)
    for index, s in enumerate(series):
        top = y0 + index * row + row * 0.1
        height = row * 0.8
        name = (
            s.name
            if len(s.name) * 6.0 < label_width - 12
            else "…" + s.name[-int((label_width - 18) / 6.0) :]
        )
        parts.append(
            f'<text x="{x0 - 8:.1f}" y="{top + height / 2 + 4:.1f}" class="tick" '
            f'text-anchor="end">{html.escape(name)}</text>'
        )
        segments: list[tuple[float, float, float]] = []  # (from, to, value)
        for (t, v), following in zip(s.points, s.points[1:] + [(end, math.nan)], strict=True):
            if not math.isfinite(v):
                continue
            if segments and segments[-1][2] == v and math.isclose(segments[-1][1], t):
                segments[-1] = (segments[-1][0], following[0], v)
            else:
                segments.append((t, following[0], v))
        for begin, finish, v in segments:
            text, color = states.get(v, (fmt(v, "short"), "#888888"))
            left, right = xpos(begin), xpos(min(finish, end))
            parts.append(
                f'<rect x="{left:.1f}" y="{top:.1f}" width="{max(right - left, 1):.1f}" '
                f'height="{height:.1f}" fill="{color}" opacity="0.8"/>'
            )
            if right - left > 7 * len(text) + 8:
                parts.append(
                    f'<text x="{left + 6:.1f}" y="{top + height / 2 + 4:.1f}" '
                    f'class="state">{html.escape(text)}</text>'
                )
    if not series:
        parts.append(f'<text x="{(x0 + x1) / 2}" y="{(y0 + y1) / 2}" class="empty">No data</text>')
    items = [(text, color, False) for text, color in states.values()]
    return f'<svg width="{w:.0f}" height="{h:.0f}">{"".join(parts)}</svg>', items


STYLE = """
body { margin: 0; background: #111217; color: #ccccdc; font: 13px Inter, "DejaVu Sans",
  Helvetica, Arial, sans-serif; }
header { display: flex; justify-content: space-between; align-items: center;
  padding: 12px 16px; border-bottom: 1px solid #2c3235; }
header h1 { font-size: 18px; font-weight: 500; margin: 0; color: #d8d9da; }
header .range { color: #9fa7b3; font-size: 12px; }
main { position: relative; margin: 8px 16px 16px; }
.panel { position: absolute; background: #181b1f; border: 1px solid #2c3235;
  border-radius: 2px; box-sizing: border-box; overflow: hidden; }
.panel h2 { font-size: 13px; font-weight: 500; margin: 0; padding: 6px 8px 2px;
  color: #d8d9da; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
.row { position: absolute; font-size: 15px; font-weight: 500; color: #d8d9da; }
.legend { padding: 0 8px; font-size: 11.5px; line-height: 17px; color: #c7d0d9; }
.legend .item { display: inline-block; margin-right: 14px; white-space: nowrap; }
.legend i { display: inline-block; width: 14px; margin-right: 6px; vertical-align: middle; }
svg .grid { stroke: #2c3235; stroke-width: 1; }
svg .tick { fill: #9fa7b3; font-size: 10.5px; }
svg .state { fill: #111217; font-size: 11px; font-weight: 500; }
svg .empty { fill: #9fa7b3; font-size: 13px; }
"""


def render_html(
    dashboard: dict[str, Any], data: dict[int, list[Series]], start: float, end: float
) -> tuple[str, int]:
    inner = WIDTH - 32
    column = (inner + GRID_GAP) / 24
    blocks = []
    bottom = 0.0
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        left = grid["x"] * column
        top = grid["y"] * (GRID_UNIT + GRID_GAP)
        width = grid["w"] * column - GRID_GAP
        height = grid["h"] * (GRID_UNIT + GRID_GAP) - GRID_GAP
        bottom = max(bottom, top + height)
        if panel["type"] == "row":
            blocks.append(
                f'<div class="row" style="left:{left:.0f}px;top:{top + 4:.0f}px">'
                f"{html.escape(panel['title'])}</div>"
            )
            continue
        series = data[panel["id"]]
        names = [s.name for s in series] if panel["type"] == "timeseries" else []
        if panel["type"] == "state-timeline":
            names = [
                v["text"]
                for v in panel["fieldConfig"]["defaults"]["mappings"][0]["options"].values()
            ]
        chart_height = height - 28 - 17 * legend_rows(names, width - 16) - 8
        draw = state_svg if panel["type"] == "state-timeline" else timeseries_svg
        svg, items = draw(panel, series, start, end, width - 2, chart_height)
        blocks.append(
            f'<div class="panel" style="left:{left:.0f}px;top:{top:.0f}px;'
            f'width:{width:.0f}px;height:{height:.0f}px">'
            f"<h2>{html.escape(panel['title'])}</h2>{svg}{legend_html(items)}</div>"
        )
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(start))
    span = end - start
    page_height = int(bottom) + 16 + 8 + 50
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><style>{STYLE}</style></head><body>"
        f"<header><h1>{html.escape(dashboard['title'])}</h1><span class='range'>"
        f"{stamp}, {span:.0f} s, from Prometheus scraping the service every second</span>"
        f"</header><main style='height:{bottom:.0f}px'>{''.join(blocks)}</main></body></html>"
    )
    return page, page_height


async def screenshot(page_html: str, height: int, out: Path, workdir: Path) -> None:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        try:
            page = await browser.new_page(viewport={"width": WIDTH, "height": height})
            await page.set_content(page_html)
            (workdir / "dashboard.html").write_text(page_html)
            await page.screenshot(path=str(out), full_page=True)
        finally:
            await browser.close()


# --- the run ---


async def main(seconds: float, out: Path, seed: int, verbose: bool) -> int:
    binary = shutil.which("prometheus")
    if binary is None:
        print(
            "render-dashboard: no prometheus binary (apt-get install prometheus)", file=sys.stderr
        )
        return 2
    if not CHROMIUM.exists():
        print(f"render-dashboard: {CHROMIUM} is absent (apt-get install chromium)", file=sys.stderr)
        return 2
    dashboard = json.loads(DASHBOARD.read_text())
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="render-dashboard-") as tmp:
        workdir = Path(tmp)
        engines = [Engine(random.Random(rng.random())), Engine(random.Random(rng.random()))]
        async with contextlib.AsyncExitStack() as stack:
            for engine in engines:
                await stack.enter_async_context(engine)
            service = await stack.enter_async_context(
                service_process(
                    workdir,
                    LLM_BACKEND="ollama",
                    OLLAMA_BASE_URL=",".join(e.url for e in engines),
                    LLM_MAX_CONNECTIONS=str(MAX_CONNECTIONS),
                    LLM_UPSTREAM_PROBE_INTERVAL_S="2",
                    CIRCUIT_BREAKER_FAILURE_THRESHOLD="3",
                    CIRCUIT_BREAKER_RECOVERY_TIMEOUT="4",
                    LOG_LEVEL="WARNING",
                )
            )
            url = await stack.enter_async_context(
                prometheus(binary, workdir, f"127.0.0.1:{service.monitoring_port}")
            )
            await asyncio.sleep(3)  # a few scrapes of the idle service first
            start = time.time()
            health = f"http://127.0.0.1:{service.monitoring_port}/health"
            tally = await traffic(service.ws_url, health, engines, seconds, seed)
            await asyncio.sleep(5)  # the last scrapes, and the service idle again
            end = time.time()
            print("frames:", json.dumps(dict(sorted(tally.frames.items()))))
            data = {}
            async with httpx.AsyncClient(timeout=10.0) as client:
                for panel in dashboard["panels"]:
                    if panel["type"] != "row":
                        data[panel["id"]] = await panel_data(client, url, panel, start - 3, end)
        if verbose:
            for panel in dashboard["panels"]:
                for s in data.get(panel["id"], []):
                    values = [v for _, v in s.points if math.isfinite(v)]
                    peak = max(values, default=math.nan)
                    print(f"{panel['title']:32} {s.name:48} max {peak:.4g} ({len(values)} points)")
        page_html, height = render_html(dashboard, data, start - 3, end)
        out.parent.mkdir(parents=True, exist_ok=True)
        await screenshot(page_html, height, out, workdir)
    empty = [p["title"] for p in dashboard["panels"] if p["type"] != "row" and not data[p["id"]]]
    print(f"wrote {out} ({len(data)} panels{'; no data: ' + ', '.join(empty) if empty else ''})")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="how long the traffic runs")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "dashboard.png")
    parser.add_argument("--seed", type=int, default=19, help="the traffic's random seed")
    parser.add_argument("--verbose", action="store_true", help="print each series' peak")
    args = parser.parse_args()
    sys.exit(asyncio.run(main(args.seconds, args.out, args.seed, args.verbose)))
