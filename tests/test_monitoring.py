"""The monitoring files against the service's real /metrics: the Grafana dashboard
(deploy/grafana/dashboards/fasttalk.json) and the alert rules (deploy/prometheus/alerts.yml).

Every PromQL expression in them is read for the series it names; the service runs against
the fake Ollama, is driven through a completed, a cancelled, a failed, a retried and a tool
calling turn and a refused connection, and each named series must be in its scrape, with the
labels the expression uses and the type its use needs (counters and histogram buckets under
rate(), gauges as they are). Where Debian's `prometheus` is installed, a real Prometheus
scrapes the service and evaluates every expression and rule; where `promtool` is, the rules'
unit tests (deploy/prometheus/alerts.test.yml) run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.fakes.ollama import FakeOllama, Reply, ollama_call
from tests.process import ROOT, free_port
from tests.support import CLOCK, RunningService, make_settings, poll, running_service

DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "fasttalk.json"
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
REQUIRED_ALERTS = {
    "LLMServiceMetricsAbsent",
    "LLMEngineUnhealthy",
    "LLMUpstreamDown",
    "LLMCircuitOpen",
    "LLMHighErrorRate",
    "LLMSlowFirstToken",
    "LLMConnectionsNearLimit",
    "LLMConnectionsRefused",
}
# What the dashboard must show, by the series its panels read.
REQUIRED_SERIES = {
    "llm_service_connections_active",
    "llm_service_connections_max",
    "llm_service_sessions_active",
    "llm_service_turns_total",
    "llm_service_tokens_generated_total",
    "llm_service_time_to_first_token_seconds_bucket",
    "llm_service_inter_token_gap_seconds_bucket",
    "llm_service_errors_total",
    "llm_service_circuit_state",
    "llm_service_upstream_up",
    "llm_service_upstream_in_flight",
    "llm_service_cancel_latency_seconds_bucket",
    "llm_service_prompt_tokens_cached_total",
    "llm_service_prompt_tokens_total",
    "llm_service_tool_calls_total",
}
# Labels Prometheus gives every scraped series (the target's), not the service.
TARGET_LABELS = {"job", "instance"}
JOB = "fasttalk-llm"  # prometheus.yml's job_name, which LLMServiceMetricsAbsent names
PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None,
    reason="no prometheus binary: apt-get install prometheus (Debian's package; .ci/run does)",
)
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="no promtool: apt-get install prometheus (Debian's package ships it)",
)


# --- PromQL: the series an expression names ---

_TOKEN = re.compile(
    r"""
    (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
  | (?P<matchers>\{(?:"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|[^}"'])*\})
  | (?P<range>\[[^\]]*\])
  | (?P<duration>\d+(?:ms|s|m|h|d|w|y)\b)
  | (?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<paren>[(),])
  | (?P<op>[-+*/%^=!<>~]+)
  | (?P<space>\s+)
    """,
    re.VERBOSE,
)
_AGGREGATIONS = {
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
    "bottomk", "topk", "quantile", "limitk", "limit_ratio",
}  # fmt: skip
_LABEL_LISTS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
_KEYWORDS = {"bool", "offset", "and", "or", "unless", "atan2", "inf", "nan", "Inf", "NaN"}
_MATCHER = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")
_RANGE_FUNCTIONS = {"rate", "irate", "increase"}


@dataclass(frozen=True)
class Selector:
    """One series selector in an expression."""

    name: str
    labels: frozenset[str]  # the label names its matchers use
    ranged: bool  # followed by a range, `[5m]`
    function: str  # the innermost function or aggregation it is an argument of ("" if none)


@dataclass
class Parsed:
    selectors: list[Selector] = field(default_factory=list)
    grouping: set[str] = field(default_factory=set)  # labels of by/without/on/ignoring/group_*


def _tokens(expr: str) -> Iterator[tuple[str, str]]:
    position = 0
    while position < len(expr):
        found = _TOKEN.match(expr, position)
        assert found and found.lastgroup, f"cannot read {expr[position:]!r} in {expr!r}"
        position = found.end()
        if found.lastgroup != "space":
            yield found.lastgroup, found.group()


def parse_promql(expr: str) -> Parsed:
    """The selectors and grouping labels of one PromQL expression (Grafana's `$__...`
    variables appear only in ranges, which are read as ranges)."""
    tokens = list(_tokens(expr))
    parsed = Parsed()
    stack: list[str] = []  # per open parenthesis: the function it calls, or "" for grouping
    pending = ""  # a function or aggregation name waiting for its "("
    index = 0
    while index < len(tokens):
        kind, text = tokens[index]
        following = tokens[index + 1] if index + 1 < len(tokens) else ("", "")
        index += 1
        if kind == "ident" and text in _LABEL_LISTS:
            if following == ("paren", "("):
                close = tokens.index(("paren", ")"), index)
                parsed.grouping |= {t for k, t in tokens[index + 1 : close] if k == "ident"}
                index = close + 1
        elif kind == "ident" and (text in _AGGREGATIONS or following == ("paren", "(")):
            pending = text
        elif kind == "ident" and text not in _KEYWORDS:
            labels: frozenset[str] = frozenset()
            if following[0] == "matchers":
                labels = frozenset(_MATCHER.findall(re.sub(r'"(?:\\.|[^"\\])*"', "", following[1])))
                index += 1
            ranged = index < len(tokens) and tokens[index][0] == "range"
            function = next((f for f in reversed(stack) if f), "")
            parsed.selectors.append(Selector(text, labels, ranged, function))
        elif kind == "matchers":
            raise AssertionError(f"a selector without a metric name in {expr!r}")
        elif (kind, text) == ("paren", "("):
            stack.append(pending)
            pending = ""
        elif (kind, text) == ("paren", ")"):
            assert stack, f"unbalanced parentheses in {expr!r}"
            stack.pop()
    assert not stack, f"unbalanced parentheses in {expr!r}"
    return parsed


def test_parse_promql_finds_selectors_labels_and_their_use() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (instance, le) (rate(a_bucket{code=~"x|y",'
        " up='}'}[$__rate_interval]))) > 2.5e-1 and on (instance) max_over_time(b[1m]) == 2"
        " or c offset 5m unless sum(d_total) by (job)"
    )
    parsed = parse_promql(expr)
    assert parsed.selectors == [
        Selector("a_bucket", frozenset({"code", "up"}), True, "rate"),
        Selector("b", frozenset(), True, "max_over_time"),
        Selector("c", frozenset(), False, ""),
        Selector("d_total", frozenset(), False, "sum"),
    ]
    assert parsed.grouping == {"instance", "le", "job"}


# --- the files ---


def load_dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return dashboard


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, those inside collapsed rows included; rows themselves left out."""
    found: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            found += panel.get("panels", [])
        else:
            found.append(panel)
    return found


def dashboard_expressions() -> list[str]:
    return [t["expr"] for p in panels(load_dashboard()) for t in p["targets"]]


def alert_rules() -> list[dict[str, Any]]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [rule for group in rules["groups"] for rule in group["rules"]]


def expressions() -> list[str]:
    return dashboard_expressions() + [str(rule["expr"]) for rule in alert_rules()]


def runnable(expr: str) -> str:
    """A dashboard expression as Prometheus takes it: Grafana's range variable filled in."""
    return expr.replace("$__rate_interval", "1m")


def test_dashboard_has_grafanas_shape() -> None:
    dashboard = load_dashboard()
    assert isinstance(dashboard["uid"], str) and re.fullmatch(r"[\w-]{1,40}", dashboard["uid"])
    assert dashboard["title"] and isinstance(dashboard["schemaVersion"], int)
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    cells: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert all(isinstance(grid[k], int) for k in ("x", "y", "w", "h")), panel["title"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        covered = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not covered & cells, f"{panel['title']} overlaps another panel"
        cells |= covered
    shown = panels(dashboard)
    assert len(shown) >= 12
    for panel in shown:
        assert panel["type"] in {"timeseries", "state-timeline", "stat", "gauge"}, panel
        assert panel["title"] and panel["datasource"] == {"type": "prometheus", "uid": "prometheus"}
        assert isinstance(panel["fieldConfig"]["defaults"].get("unit", "short"), str)
        refs = [target["refId"] for target in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"]
            assert target["expr"].strip() and "legendFormat" in target
    names = {s.name for expr in dashboard_expressions() for s in parse_promql(expr).selectors}
    assert names >= REQUIRED_SERIES, REQUIRED_SERIES - names
    quantiles = [e for e in dashboard_expressions() if e.startswith("histogram_quantile(")]
    for histogram in ("time_to_first_token", "inter_token_gap", "cancel_latency"):
        assert any(f"llm_service_{histogram}_seconds_bucket" in e for e in quantiles), histogram


def test_alert_rules_parse_and_hold_the_required_alerts() -> None:
    rules = alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names))
    assert set(names) >= REQUIRED_ALERTS, REQUIRED_ALERTS - set(names)
    for rule in rules:
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
        assert parse_promql(str(rule["expr"])).selectors, rule["alert"]
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    assert config["rule_files"] == [ALERTS.name]
    assert [job["job_name"] for job in config["scrape_configs"]] == [JOB]


@needs_promtool
@pytest.mark.parametrize(
    "command",
    [
        ["check", "config", "prometheus.yml"],
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts.test.yml"],
    ],
    ids=["check-config", "check-rules", "test-rules"],
)
def test_promtool(command: list[str]) -> None:
    assert PROMTOOL is not None
    done = subprocess.run(
        [PROMTOOL, *command], cwd=PROMETHEUS_DIR, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout + done.stderr


# --- the live service ---


async def drive(service: RunningService, fake: FakeOllama) -> None:
    """One of each: a completed turn, a cancelled one, a failed one, one retried, a tool call
    answered, and a connection refused at LLM_MAX_CONNECTIONS (2)."""
    client = await service.connect()
    await client.start()
    assert (await client.turn("Hello"))[-1]["type"] == "response_complete"

    fake.script(Reply(chunks=["tok"] * 200, delay=0.02))
    await client.send({"type": "user_message", "text": "Talk a while"})
    assert (await client.recv())["type"] == "token"
    await client.send({"type": "cancel"})
    assert (await client.recv_until("cancelled"))[-1]["success"] is True

    fake.script(Reply(chunks=["Half", " a", " reply"], error_after=1))
    failed = (await client.turn("Fail, please"))[-1]
    assert failed["type"] == "error" and failed["error"]["code"] == "upstream_error"

    fake.script(Reply(status=503, error="server busy"), Reply(chunks=["Second", " try"]))
    assert (await client.turn("Busy?"))[-1]["type"] == "response_complete"

    tools = await service.connect()
    await tools.start()
    await tools.send({"type": "start_session", "config": {"tools": [CLOCK]}})
    assert (await tools.recv())["type"] == "session_configured"
    call = ollama_call("get_time", {"city": "Lisbon"})
    fake.script(Reply(["Checking."], tool_calls=[call]), Reply(["Noon."]))
    frames = await tools.turn("Time in Lisbon?")
    [asked] = [f for f in frames if f["type"] == "tool_call"]
    results = [{"id": c["id"], "content": "12:00"} for c in asked["calls"]]
    await tools.send({"type": "tool_result", "results": results})
    assert (await tools.recv_until("response_complete"))[-1]["type"] == "response_complete"

    refused = await service.connect()
    frame = await refused.recv()
    assert frame["type"] == "error" and frame["error"]["code"] == "max_connections"
    for each in (refused, tools, client):
        await each.close()


@contextlib.asynccontextmanager
async def driven_service() -> AsyncIterator[tuple[RunningService, FakeOllama]]:
    async with FakeOllama() as fake:
        settings = make_settings(ollama_base_url=fake.url, llm_max_connections=2)
        async with running_service(settings) as service:
            yield service, fake


@dataclass(frozen=True)
class Scrape:
    """A /metrics body: each sample name with its family's type and the labels it carries."""

    types: dict[str, str]
    labels: dict[str, set[str]]

    @classmethod
    def of(cls, text: str) -> Scrape:
        types: dict[str, str] = {}
        labels: dict[str, set[str]] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                types[sample.name] = family.type
                labels.setdefault(sample.name, set()).update(sample.labels)
        return cls(types, labels)


def check_against(scrape: Scrape, expr: str) -> list[str]:
    """What in `expr` the scrape does not bear out."""
    problems: list[str] = []
    parsed = parse_promql(expr)
    known_labels = set(TARGET_LABELS)
    for selector in parsed.selectors:
        name = selector.name
        if name not in scrape.types:
            problems.append(f"{name} is not in /metrics")
            continue
        known_labels |= scrape.labels[name]
        if missing := selector.labels - scrape.labels[name] - TARGET_LABELS:
            problems.append(f"{name} has no label {sorted(missing)}")
        kind = scrape.types[name]
        if kind == "counter" or name.endswith("_bucket"):
            if not (selector.ranged and selector.function in _RANGE_FUNCTIONS):
                problems.append(f"{name} ({kind}) is used outside rate()/increase()")
        elif selector.ranged and not selector.function.endswith("_over_time"):
            problems.append(f"{name} ({kind}) has a range outside an *_over_time function")
    if unknown := parsed.grouping - known_labels:
        problems.append(f"groups by labels no series has: {sorted(unknown)}")
    return problems


async def test_every_series_the_dashboard_and_alerts_use_is_in_the_live_scrape() -> None:
    async with driven_service() as (service, fake):
        await drive(service, fake)
        response = await service.get("/metrics", monitoring=True)
    assert response.status_code == 200
    scrape = Scrape.of(response.text)
    # the traffic made the labelled counters' series, which exist only once counted
    for needed in (
        "llm_service_errors_total",
        "llm_service_tool_calls_total",
        "llm_service_upstream_retries_total",
        "llm_service_connections_rejected_total",
    ):
        assert needed in scrape.types, needed
    problems = {expr: found for expr in expressions() if (found := check_against(scrape, expr))}
    assert not problems, json.dumps(problems, indent=2)


def test_the_check_catches_a_wrong_name_label_or_use() -> None:
    scrape = Scrape.of(
        '# TYPE t_total counter\nt_total{code="x"} 1\n# TYPE g gauge\ng 1\n'
        '# TYPE h histogram\nh_bucket{le="1.0"} 1\nh_bucket{le="+Inf"} 1\nh_sum 1\nh_count 1\n'
    )
    assert check_against(scrape, 'sum by (code) (rate(t_total{code="x"}[5m])) / g') == []
    assert check_against(scrape, "histogram_quantile(0.9, sum by (le) (rate(h_bucket[5m])))") == []
    assert check_against(scrape, "rate(t[5m])") == ["t is not in /metrics"]
    assert check_against(scrape, 'rate(t_total{reason="x"}[5m])') == [
        "t_total has no label ['reason']"
    ]
    assert check_against(scrape, "t_total > 0") == [
        "t_total (counter) is used outside rate()/increase()"
    ]
    assert check_against(scrape, "rate(g[5m])") == [
        "g (gauge) has a range outside an *_over_time function"
    ]
    assert check_against(scrape, "sum by (outcome) (g)") == [
        "groups by labels no series has: ['outcome']"
    ]


# --- a real Prometheus ---


@contextlib.asynccontextmanager
async def prometheus(tmp_path: Path, target: str) -> AsyncIterator[str]:
    """Prometheus on a free 127.0.0.1 port, scraping `target` every second and evaluating
    alerts.yml every second; yields its base URL."""
    assert PROMETHEUS is not None
    port = free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": [target]}]}],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = (tmp_path / "prometheus.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        PROMETHEUS,
        f"--config.file={tmp_path / 'prometheus.yml'}",
        f"--storage.tsdb.path={tmp_path / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(timeout=5.0) as client:

            async def ready() -> bool:
                assert proc.returncode is None, (tmp_path / "prometheus.log").read_text()
                with contextlib.suppress(httpx.TransportError):
                    return (await client.get(url + "/-/ready")).status_code == 200
                return False

            await poll(ready, limit=30)
        yield url
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        log.close()


async def query(client: httpx.AsyncClient, url: str, expr: str) -> dict[str, Any]:
    response = await client.get(url + "/api/v1/query", params={"query": expr})
    body: dict[str, Any] = response.json()
    assert response.status_code == 200 and body["status"] == "success", (expr, body)
    return body


async def scrapes(client: httpx.AsyncClient, url: str) -> int:
    """How many scrapes of the service Prometheus holds from the last minute."""
    body = await query(client, url, f'count_over_time(up{{job="{JOB}"}}[1m])')
    result = body["data"]["result"]
    return int(float(result[0]["value"][1])) if result else 0


@needs_prometheus
@pytest.mark.slow
async def test_a_real_prometheus_evaluates_every_expression(tmp_path: Path) -> None:
    async with (
        driven_service() as (service, fake),
        prometheus(tmp_path, f"127.0.0.1:{service.monitoring_port}") as url,
        httpx.AsyncClient(timeout=10.0) as client,
    ):
        await poll(lambda: _at_least(client, url, 1), limit=30)
        await drive(service, fake)  # between scrapes, so that the rates are not all zero
        before = await scrapes(client, url)
        await poll(lambda: _at_least(client, url, before + 2), limit=30)

        target = (await client.get(url + "/api/v1/targets")).json()["data"]["activeTargets"]
        assert [t["health"] for t in target] == ["up"], target

        empty = []
        for expr in dashboard_expressions():
            body = await query(client, url, runnable(expr))
            if not body["data"]["result"]:
                empty.append(expr)
        assert not empty, "dashboard queries that found no series:\n" + "\n".join(empty)
        [turns] = [e for e in dashboard_expressions() if "llm_service_turns_total" in e]
        outcomes = await query(client, url, runnable(turns))
        assert {r["metric"].get("outcome") for r in outcomes["data"]["result"]} >= {
            "completed",
            "cancelled",
            "failed",
        }

        quiet = {"LLMServiceMetricsAbsent", "LLMEngineUnhealthy", "LLMUpstreamDown"}
        for rule in alert_rules():
            body = await query(client, url, str(rule["expr"]))
            if rule["alert"] in quiet:  # a healthy service, scraped: these find nothing
                assert body["data"]["result"] == [], (rule["alert"], body)

        async def rules_evaluated() -> bool:
            groups = (await client.get(url + "/api/v1/rules")).json()["data"]["groups"]
            loaded = [r for g in groups for r in g["rules"]]
            assert {r["name"] for r in loaded} == {r["alert"] for r in alert_rules()}
            assert all(r["health"] != "err" for r in loaded), loaded
            return all(r["health"] == "ok" for r in loaded)

        await poll(rules_evaluated, limit=30)


async def _at_least(client: httpx.AsyncClient, url: str, count: int) -> bool:
    return await scrapes(client, url) >= count
