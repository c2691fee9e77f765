"""The Ollama backend in-process against the fake Ollama: `pull()` (the progress lines it
yields, what it asks for, and how a failed pull reads), the tool calls it takes from a
chat stream and the words it refuses malformed ones with, and how an HTTP error status
before the stream becomes the service's error, message and class."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import pytest

from llm_service.backends.base import (
    ChatMessage,
    ChatRequest,
    EngineStatus,
    StreamEnd,
    StreamItem,
    ToolCall,
    ToolCalls,
)
from llm_service.backends.ollama import OllamaBackend, PullProgress
from llm_service.errors import (
    EngineError,
    MalformedToolCall,
    ModelNotFound,
    UpstreamError,
    UpstreamRejected,
    UpstreamUnavailable,
)
from llm_service.sampling import SamplingParams
from tests.fakes.ollama import DEFAULT_MODEL, FakeOllama, Reply, ollama_call

LIMIT_S = 30.0  # generous: the machine may be loaded; no test waits this long when it passes
NOT_AN_OBJECT = "sent a call of 'get_time' whose arguments are not a JSON object"


@pytest.fixture
async def backend(fake_ollama: FakeOllama) -> AsyncIterator[OllamaBackend]:
    engine = OllamaBackend(fake_ollama.url, DEFAULT_MODEL)
    try:
        yield engine
    finally:
        await engine.aclose()


def chat_request() -> ChatRequest:
    return ChatRequest([ChatMessage("user", "hi")], SamplingParams(), 8192)


async def pulled(backend: OllamaBackend) -> list[PullProgress]:
    """Every progress line of one pull."""
    async with asyncio.timeout(LIMIT_S):
        async with contextlib.aclosing(backend.pull()) as progress:
            return [line async for line in progress]


async def streamed(backend: OllamaBackend) -> list[StreamItem]:
    """Every item of one chat reply."""
    async with asyncio.timeout(LIMIT_S):
        async with contextlib.aclosing(backend.stream_chat(chat_request())) as stream:
            return [item async for item in stream]


async def pull_error(backend: OllamaBackend) -> EngineError:
    with pytest.raises(EngineError) as caught:
        await pulled(backend)
    return caught.value


async def chat_error(backend: OllamaBackend) -> EngineError:
    with pytest.raises(EngineError) as caught:
        await streamed(backend)
    return caught.value


def calls_of(items: list[StreamItem]) -> tuple[ToolCall, ...]:
    found = [item for item in items if isinstance(item, ToolCalls)]
    assert len(found) == 1, items
    return found[0].calls


# --- pull() -----------------------------------------------------------------------------------


async def test_a_pull_yields_ollamas_progress_lines_in_order(
    fake_ollama: FakeOllama, backend: OllamaBackend
) -> None:
    """Each NDJSON line of /api/pull becomes one PullProgress, status and byte counts as sent."""
    layer = "pulling " + "b" * 12
    assert await pulled(backend) == [
        PullProgress("pulling manifest"),
        *(PullProgress(layer, completed=n * 1_000_000, total=4_000_000) for n in range(5)),
        PullProgress("success"),
    ]


async def test_a_pull_asks_ollama_for_the_backends_model_as_a_stream(
    fake_ollama: FakeOllama, backend: OllamaBackend
) -> None:
    """The request names the configured model and asks for streamed progress."""
    await pulled(backend)
    assert fake_ollama.pulls == [{"model": DEFAULT_MODEL, "stream": True}]


async def test_a_pull_skips_empty_lines_and_reads_a_line_without_status_as_an_empty_status(
    fake_ollama: FakeOllama, backend: OllamaBackend
) -> None:
    """Blank lines between progress lines are skipped, not the end; missing fields read as
    an empty status and no counts."""
    fake_ollama.pull_body = (
        b'{"status": "pulling manifest"}\n\n'
        b'{"completed": 5, "total": 10}\n'
        b"\n\n"
        b'{"status": "success"}\n'
    )
    assert await pulled(backend) == [
        PullProgress("pulling manifest"),
        PullProgress("", completed=5, total=10),
        PullProgress("success"),
    ]


async def test_a_pull_of_a_model_ollama_does_not_know_raises_model_not_found(
    fake_ollama: FakeOllama, backend: OllamaBackend
) -> None:
    """A 404 before the stream names the model and carries Ollama's own words."""
    fake_ollama.pull_status = 404
    fake_ollama.pull_error = "pull model manifest: file does not exist"
    error = await pull_error(backend)
    assert type(error) is ModelNotFound
    assert error.message == (
        f"Ollama found no model {DEFAULT_MODEL!r} to pull "
        "(pull model manifest: file does not exist)"
    )


@pytest.mark.parametrize(
    ("status", "kind"),
    [(503, UpstreamUnavailable), (400, UpstreamRejected), (500, UpstreamError)],
)
async def test_a_pull_answered_with_an_error_status_raises_by_that_status(
    fake_ollama: FakeOllama, backend: OllamaBackend, status: int, kind: type[EngineError]
) -> None:
    """Any other status before the stream is translated as a chat's is."""
    fake_ollama.pull_status = status
    fake_ollama.pull_error = "no space left on device"
    error = await pull_error(backend)
    assert type(error) is kind
    assert error.message == f"Ollama answered {status}: no space left on device"


async def test_an_error_line_in_a_pull_raises_upstream_error_naming_the_model(
    fake_ollama: FakeOllama, backend: OllamaBackend
) -> None:
    """An in-band `{"error": ...}` line ends the pull with Ollama's words, after the lines
    before it."""
    fake_ollama.pull_body = (
        b'{"status": "pulling manifest"}\n{"error": "pull model manifest: file does not exist"}\n'
        b'{"status": "success"}\n'
    )
    seen: list[PullProgress] = []
    with pytest.raises(EngineError) as caught:
        async with asyncio.timeout(LIMIT_S):
            async with contextlib.aclosing(backend.pull()) as progress:
                async for line in progress:
                    seen.append(line)
    assert seen == [PullProgress("pulling manifest")]
    assert type(caught.value) is UpstreamError
    assert caught.value.message == (
        f"Ollama could not pull {DEFAULT_MODEL}: pull model manifest: file does not exist"
    )


async def test_an_unreadable_pull_line_raises_upstream_error(
    fake_ollama: FakeOllama, backend: OllamaBackend
) -> None:
    """A line that is not JSON (a proxy's page) ends the pull, naming the engine."""
    fake_ollama.pull_body = b'{"status": "pulling manifest"}\n<html>502 Bad Gateway</html>\n'
    error = await pull_error(backend)
    assert type(error) is UpstreamError
    assert error.message == (
        f"Ollama at {fake_ollama.url} sent an unreadable progress line from /api/pull"
    )


@pytest.mark.parametrize("line", [b"[1]", b'"text"', b"5", b'"error"'])
async def test_a_pull_line_that_is_json_but_not_an_object_raises_upstream_error(
    fake_ollama: FakeOllama, backend: OllamaBackend, line: bytes
) -> None:
    """JSON that is not an object (a list, a string, a number) is as unreadable as non-JSON."""
    fake_ollama.pull_body = b'{"status": "pulling manifest"}\n' + line + b"\n"
    error = await pull_error(backend)
    assert type(error) is UpstreamError
    assert error.message == (
        f"Ollama at {fake_ollama.url} sent an unreadable progress line from /api/pull"
    )


async def test_a_404_without_words_names_only_the_model(
    fake_ollama: FakeOllama, backend: OllamaBackend
) -> None:
    """No empty brackets where Ollama gave no reason."""
    fake_ollama.pull_status = 404
    fake_ollama.pull_error = ""
    error = await pull_error(backend)
    assert type(error) is ModelNotFound
    assert error.message == f"Ollama found no model {DEFAULT_MODEL!r} to pull"


@pytest.mark.parametrize("failed", [pull_error, chat_error], ids=["pull", "chat"])
async def test_an_ollama_that_refuses_connections_raises_upstream_unavailable(
    fake_ollama: FakeOllama,
    backend: OllamaBackend,
    failed: Callable[[OllamaBackend], Awaitable[EngineError]],
) -> None:
    """A connection error is translated once, naming the engine, in a pull as in a chat."""
    await fake_ollama.refuse()
    error = await failed(backend)
    assert type(error) is UpstreamUnavailable
    assert error.message == (
        f"Ollama at {fake_ollama.url} cannot be reached (connection refused or host unreachable)"
    )


# --- status() --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "tags", "available"),
    [
        ("llama3.2", ["llama3.2:latest"], True),  # no tag is Ollama's :latest
        ("llama3.2:latest", ["llama3.2"], True),
        ("llama3.2:3b", ["llama3.2:latest"], False),
        ("reg.local:5000/team/llama3.2", ["reg.local:5000/team/llama3.2:latest"], True),
        ("reg.local:5000/team/llama3.2", ["reg.local:5000/team/llama3.2:8b"], False),
    ],
)
async def test_the_probe_finds_the_model_under_ollamas_default_tag(
    model: str, tags: list[str], available: bool
) -> None:
    """A name without a tag is the `:latest` one, both in the service's setting and in
    Ollama's list; the colon of a registry's port is not a tag."""
    async with FakeOllama(models=tuple(tags)) as fake:
        backend = OllamaBackend(fake.url, model)
        try:
            status = await backend.status()
        finally:
            await backend.aclose()
    assert status == EngineStatus(
        reachable=True, detail=f"Ollama at {fake.url}", version="0.12.6", model_available=available
    )


async def test_a_model_list_without_models_finds_no_model(
    fake_ollama: FakeOllama, backend: OllamaBackend
) -> None:
    fake_ollama.tags_body = b"{}"
    status = await backend.status()
    assert (status.reachable, status.model_available) == (True, False)


@pytest.mark.parametrize("body", [b"<html>It works!</html>", b"[]", b'{"models": [5]}'])
async def test_a_probe_answered_not_as_ollama_answers_says_so(
    fake_ollama: FakeOllama, backend: OllamaBackend, body: bytes
) -> None:
    """A server on Ollama's port that is not Ollama (or not a version the service knows)."""
    fake_ollama.tags_body = body
    assert await backend.status() == EngineStatus(
        reachable=False, detail=f"Ollama at {fake_ollama.url} answered, but not as Ollama does"
    )


@pytest.mark.parametrize("stalled", ["version", "tags"])
async def test_a_probe_ollama_does_not_answer_gives_up_at_its_own_deadline(
    fake_ollama: FakeOllama, backend: OllamaBackend, stalled: str
) -> None:
    """Each request of the probe has its own deadline (PROBE_TIMEOUT_S, 1 s), not the 125 s
    a reply's read may take."""
    gate = asyncio.Event()
    setattr(fake_ollama, f"{stalled}_gate", gate)
    try:
        status = await asyncio.wait_for(backend.status(), LIMIT_S / 3)
    finally:
        gate.set()
    assert status == EngineStatus(
        reachable=False, detail=f"Ollama at {fake_ollama.url} sent nothing within the read timeout"
    )


# --- a chat stream ---------------------------------------------------------------------------


async def test_a_chat_request_is_sent_as_json_with_no_trace_when_the_turn_has_none(
    fake_ollama: FakeOllama, backend: OllamaBackend
) -> None:
    await streamed(backend)
    headers = {name.lower(): value for name, value in fake_ollama.chats[0].headers.items()}
    assert headers["content-type"] == "application/json"
    assert "traceparent" not in headers
    assert "authorization" not in headers
    assert fake_ollama.chats[0].body["keep_alive"] == "5m"  # by default, as Ollama's own


@pytest.mark.parametrize(
    ("setting", "sent"), [("10m", "10m"), ("300", 300), ("-1", -1), ("0", 0), ("1.5", 1.5)]
)
async def test_keep_alive_goes_as_a_duration_or_as_a_number_of_seconds(
    fake_ollama: FakeOllama, setting: str, sent: str | float
) -> None:
    """Ollama reads a bare number as seconds, and a string only with a unit: a number
    setting goes as a JSON number, whole where it is whole."""
    backend = OllamaBackend(fake_ollama.url, DEFAULT_MODEL, keep_alive=setting)
    try:
        await streamed(backend)
    finally:
        await backend.aclose()
    value = fake_ollama.chats[0].body["keep_alive"]
    assert (value, type(value)) == (sent, type(sent))


async def test_an_api_key_is_sent_as_a_bearer_token(
    fake_ollama: FakeOllama,
) -> None:
    """For an Ollama behind a proxy that asks for one (OLLAMA_API_KEY)."""
    backend = OllamaBackend(fake_ollama.url, DEFAULT_MODEL, api_key="s3cret")
    try:
        await streamed(backend)
    finally:
        await backend.aclose()
    [chat] = fake_ollama.chats
    assert {k.lower(): v for k, v in chat.headers.items()}["authorization"] == "Bearer s3cret"


async def test_empty_lines_between_chunks_are_skipped(
    fake_ollama: FakeOllama, backend: OllamaBackend
) -> None:
    fake_ollama.script(Reply(chunks=["Hi", " there"], blank_lines=True))
    items = await streamed(backend)
    assert items[:-1] == ["Hi", " there"] and isinstance(items[-1], StreamEnd)


async def test_a_connection_dropped_mid_reply_raises_upstream_error_naming_the_engine(
    fake_ollama: FakeOllama, backend: OllamaBackend
) -> None:
    """The words depend on where the read was when the connection went; the engine and the
    moment do not."""
    fake_ollama.script(Reply(chunks=["Hi", " there"], drop_after=1))
    error = await chat_error(backend)
    assert type(error) is UpstreamError
    assert error.message.startswith(f"Ollama at {fake_ollama.url} ")
    assert error.message.endswith(" mid-reply")


# --- tool calls in a chat stream -------------------------------------------------------------


async def test_a_tool_call_without_arguments_is_a_call_with_empty_arguments(
    fake_ollama: FakeOllama, backend: OllamaBackend
) -> None:
    """A function with no `arguments` field is called with `{}`."""
    fake_ollama.script(Reply(chunks=[], tool_calls=[{"function": {"name": "get_time"}}]))
    (call,) = calls_of(await streamed(backend))
    assert (call.name, call.arguments) == ("get_time", {})


async def test_tool_calls_that_are_not_a_list_are_refused(
    fake_ollama: FakeOllama, backend: OllamaBackend
) -> None:
    """`message.tool_calls` must be a list of calls."""
    one_call = ollama_call("get_time", {})
    # The fake sends tool_calls as given: here one call object, not a list of them.
    fake_ollama.script(Reply(chunks=[], tool_calls=cast(list[dict[str, Any]], one_call)))
    error = await chat_error(backend)
    assert type(error) is MalformedToolCall
    assert error.message == f"Ollama at {fake_ollama.url} sent tool_calls that are not a list"


@pytest.mark.parametrize(
    "item",
    [{"id": "call_1"}, {"function": "get_time"}, "get_time", ["get_time"]],
    ids=["no function", "function not an object", "call a string", "call a list"],
)
async def test_a_tool_call_without_a_function_object_is_refused(
    fake_ollama: FakeOllama, backend: OllamaBackend, item: Any
) -> None:
    """Each call must be an object whose `function` is an object."""
    fake_ollama.script(Reply(chunks=[], tool_calls=[item]))
    error = await chat_error(backend)
    assert type(error) is MalformedToolCall
    assert error.message == f"Ollama at {fake_ollama.url} sent a tool call without a function"


@pytest.mark.parametrize(
    ("function", "words"),
    [
        ({"arguments": {}}, "sent a tool call without a function name"),
        ({"name": "get_time", "arguments": None}, NOT_AN_OBJECT),
        ({"name": "get_time", "arguments": [1]}, NOT_AN_OBJECT),
    ],
    ids=["no name", "arguments null", "arguments a list"],
)
async def test_a_malformed_tool_call_is_refused_in_words_that_name_the_engine(
    fake_ollama: FakeOllama, backend: OllamaBackend, function: dict[str, Any], words: str
) -> None:
    """What `tool_call` refuses, it refuses as "Ollama at <url> ..."."""
    fake_ollama.script(Reply(chunks=[], tool_calls=[{"function": function}]))
    error = await chat_error(backend)
    assert type(error) is MalformedToolCall
    assert error.message == f"Ollama at {fake_ollama.url} {words}"


# --- an HTTP error status before the chat stream --------------------------------------------


async def test_an_error_status_with_ollamas_json_body_carries_its_error_field(
    fake_ollama: FakeOllama, backend: OllamaBackend
) -> None:
    """The message is Ollama's own `error`, after the status."""
    fake_ollama.script(Reply(status=500, error="llama runner process has terminated"))
    error = await chat_error(backend)
    assert type(error) is UpstreamError
    assert error.message == "Ollama answered 500: llama runner process has terminated"


@pytest.mark.parametrize(
    "body",
    [b'{"detail": "oops"}', b'{"error": ""}', b'{"error": null}'],
    ids=["no error field", "error empty", "error null"],
)
async def test_an_error_status_with_a_json_body_but_no_error_falls_back_to_the_reason(
    fake_ollama: FakeOllama, backend: OllamaBackend, body: bytes
) -> None:
    """A JSON body without a (non-empty) `error` gives the status' reason phrase."""
    fake_ollama.script(Reply(status=500, error_body=body))
    error = await chat_error(backend)
    assert type(error) is UpstreamError
    assert error.message == "Ollama answered 500: Internal Server Error"


async def test_an_error_status_with_a_body_that_is_not_json_carries_its_first_500_bytes(
    fake_ollama: FakeOllama, backend: OllamaBackend
) -> None:
    """A proxy's page is cut at 500 bytes, invalid UTF-8 replaced, whitespace stripped."""
    body = b"  \n<p>\xff" + b"x" * 600
    fake_ollama.script(Reply(status=502, error_body=body))
    error = await chat_error(backend)
    assert type(error) is UpstreamUnavailable
    assert error.message == "Ollama answered 502: <p>\ufffd" + "x" * 493


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (429, UpstreamUnavailable),
        (502, UpstreamUnavailable),
        (503, UpstreamUnavailable),
        (504, UpstreamUnavailable),
        (400, UpstreamRejected),
        (430, UpstreamRejected),
        (499, UpstreamRejected),
        (500, UpstreamError),
        (501, UpstreamError),
        (505, UpstreamError),
    ],
)
async def test_an_error_status_raises_by_its_class_of_failure(
    fake_ollama: FakeOllama,
    backend: OllamaBackend,
    status: int,
    kind: type[EngineError],
) -> None:
    """429 and the gateway failures are the engine unavailable; other 4xx a rejection; other
    5xx an upstream error; each message names the status and Ollama's words."""
    fake_ollama.script(Reply(status=status, error="busy"))
    error = await chat_error(backend)
    assert type(error) is kind
    assert error.message == f"Ollama answered {status}: busy"


async def test_a_replys_end_carries_ollamas_counts_and_the_speed_of_its_evaluation(
    fake_ollama: FakeOllama, backend: OllamaBackend
) -> None:
    """The done line's counters become the stream's end: 10 tokens evaluated in 250 ms are
    40 tokens a second by the engine's own clock."""
    fake_ollama.script(
        Reply(
            chunks=["Hi"],
            eval_count=10,
            eval_duration=250_000_000,
            prompt_eval_count=7,
            prompt_eval_cached_count=3,
            done_reason="length",
        )
    )
    items = await streamed(backend)
    assert items == [
        "Hi",
        StreamEnd(
            completion_tokens=10,
            prompt_tokens=7,
            prompt_cached_tokens=3,
            done_reason="length",
            engine_tokens_per_second=40.0,
        ),
    ]


@pytest.mark.parametrize(("eval_count", "eval_duration"), [(0, 250_000_000), (10, None), (10, 0)])
async def test_a_reply_without_both_counters_has_no_engine_speed(
    fake_ollama: FakeOllama, backend: OllamaBackend, eval_count: int, eval_duration: int | None
) -> None:
    """No tokens counted, or no time given for them, gives no engine speed: never a zero,
    never a division by nothing."""
    fake_ollama.script(Reply(chunks=["Hi"], eval_count=eval_count, eval_duration=eval_duration))
    end = (await streamed(backend))[-1]
    assert isinstance(end, StreamEnd)
    assert (end.completion_tokens, end.engine_tokens_per_second) == (eval_count, None)


@pytest.mark.parametrize("line", [b"[1]", b'"text"', b"5", b'"error"', b'{"message": 5}'])
async def test_a_chat_line_that_is_json_but_not_a_chunk_raises_upstream_error(
    fake_ollama: FakeOllama, backend: OllamaBackend, line: bytes
) -> None:
    """A list, a string or a number where a chunk belongs ends the reply as the engine's
    fault, in the service's words, never as an exception of the code reading it."""
    fake_ollama.script(Reply(chunks=["Hi", " there"], garbage_after=1, garbage=line))
    error = await chat_error(backend)
    assert type(error) is UpstreamError
    assert error.message == (
        f"Ollama at {fake_ollama.url} sent a line that is not a chat chunk ({len(line)} characters)"
    )


async def test_a_chat_for_a_model_ollama_does_not_know_raises_model_not_found(
    fake_ollama: FakeOllama,
) -> None:
    """A 404 names the model and carries Ollama's words."""
    backend = OllamaBackend(fake_ollama.url, "missing:3b")
    try:
        error = await chat_error(backend)
    finally:
        await backend.aclose()
    assert type(error) is ModelNotFound
    assert error.message == (
        "model 'missing:3b' not found in Ollama; pull it first "
        '(model "missing:3b" not found, try pulling it first)'
    )
