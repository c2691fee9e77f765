"""The wire frames of `/ws/llm`: every client frame parsed in, every server frame built here.

Parsing is strict and total: any text a client sends either becomes one of the typed frames
below or raises the `ClientError` that names what is wrong (`invalid_json`, `invalid_message`,
`invalid_config`, `message_too_large`). Unknown fields of a frame are ignored, as PROTOCOL.md
requires; unknown fields of a `start_session` config are ignored too, and named back in
`session_configured`'s `ignored_fields`, so a typo (`temprature`) does not pass unnoticed.

Server frames are built by the functions at the end, one per frame type, from the plain
values the conversation hands over; they return the encoded text, ready to send. The token
frame, sent once per chunk, is one `orjson.dumps` and nothing else.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Annotated, Any, Literal

import orjson
from fastapi.responses import JSONResponse
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
)

from llm_service.backends.base import ToolCall
from llm_service.conversation import (
    MAX_RESPONSE_ID,
    Chunking,
    Entry,
    SessionConfig,
    SessionSummary,
    ToolChoice,
    TurnStats,
)
from llm_service.errors import (
    InvalidConfig,
    InvalidJSON,
    InvalidMessage,
    MessageTooLarge,
    ServiceError,
)
from llm_service.sampling import SamplingParams, describe
from llm_service.tracing import TRACEPARENT, Parent

MAX_SYSTEM_PROMPT_CHARS = 200_000
MAX_TOOLS = 64
MAX_TOOL_RESULTS = 64


class ToolFunction(BaseModel):
    """A function the model may call: its name, what it does, a JSON Schema of its arguments."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str = Field("", max_length=4096)
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})

    @field_validator("parameters")
    @classmethod
    def _an_object_schema(cls, schema: dict[str, Any]) -> dict[str, Any]:
        if schema.get("type") != "object":
            raise ValueError("must be a JSON Schema whose 'type' is 'object'")
        return schema


class ToolFunctionName(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")


class ForcedTool(BaseModel):
    """`tool_choice` naming one function: the model must call it."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)
    type: Literal["function"]
    function: ToolFunctionName


ToolChoiceField = Literal["auto", "none", "required"] | ForcedTool


class ToolSpec(BaseModel):
    """One entry of a session's `tools`: the shape Ollama and OpenAI-compatible engines share."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)
    type: Literal["function"]
    function: ToolFunction


def _distinct_names(tools: list[ToolSpec] | None) -> list[ToolSpec] | None:
    names = [t.function.name for t in tools or ()]
    if len(set(names)) != len(names):
        raise ValueError("two tools have the same name")
    return tools


ConfigUpdate = create_model(
    "ConfigUpdate",
    __config__=ConfigDict(strict=True, extra="ignore", frozen=True),
    __doc__="The `config` of a `start_session` frame: every field optional, checked strictly.",
    system_prompt=(str | None, Field(None, max_length=MAX_SYSTEM_PROMPT_CHARS)),
    chunking=(Chunking | None, None),
    tools=(
        Annotated[list[ToolSpec] | None, AfterValidator(_distinct_names)],
        Field(None, max_length=MAX_TOOLS),
    ),
    tool_choice=(ToolChoiceField | None, None),
    **SamplingParams.optional_fields(),
)


@dataclass(frozen=True, slots=True)
class ConfigChanges:
    """What a `start_session` config set; None (or empty sampling) where it set nothing."""

    system_prompt: str | None
    sampling: dict[str, Any]
    chunking: Chunking | None
    tools: list[dict[str, Any]] | None
    tool_choice: ToolChoice | None


@dataclass(frozen=True, slots=True)
class StartSession:
    config: Any  # a ConfigUpdate, whose fields are built from SamplingParams'
    ignored: tuple[str, ...] = ()  # fields of the config the service does not know

    def changes(self) -> ConfigChanges:
        values = self.config.model_dump(exclude_none=True)
        return ConfigChanges(
            values.pop("system_prompt", None),
            values,
            values.pop("chunking", None),
            values.pop("tools", None),
            values.pop("tool_choice", None),
        )


@dataclass(frozen=True, slots=True)
class UserMessage:
    text: str
    response_id: str | None = None  # the client's name for the reply; None: one is made
    interrupt: bool = False  # cancel the reply streaming, if any, and start this one
    tool_choice: ToolChoice | None = None  # for this reply; None: the session's
    trace: Parent | None = None  # the client's trace this turn continues


@dataclass(frozen=True, slots=True)
class ToolResult:
    results: tuple[tuple[str, str], ...]  # (the call's id, its result as text), in order
    response_id: str | None = None  # the follow-up reply's; None: one is made
    tool_choice: ToolChoice | None = None  # for the follow-up; None: the session's
    trace: Parent | None = None  # the client's trace the follow-up continues


@dataclass(frozen=True, slots=True)
class Truncate:
    response_id: str
    heard_chars: int  # code points of the reply the user heard


@dataclass(frozen=True, slots=True)
class Cancel:
    pass


@dataclass(frozen=True, slots=True)
class EndSession:
    pass


@dataclass(frozen=True, slots=True)
class GetHistory:
    pass


@dataclass(frozen=True, slots=True)
class Resume:
    session_id: str
    resume_token: str
    last_seq: int  # the last seq the client saw; -1: none


ClientFrame = (
    StartSession | UserMessage | ToolResult | Truncate | Cancel | EndSession | GetHistory | Resume
)

_SIMPLE: dict[str, ClientFrame] = {
    "cancel": Cancel(),
    "end_session": EndSession(),
    "get_history": GetHistory(),
}
KNOWN_TYPES = ("start_session", "user_message", "tool_result", "truncate", "resume", *_SIMPLE)
_MAX_ID = 128
_MAX_TRACESTATE = 512  # what W3C trace-context asks every hop to pass on, at least
_SAMPLING = SamplingParams.names()


def parse_client_frame(text: str, max_bytes: int) -> ClientFrame:
    """Turn one text frame into a typed client frame, or raise the `ClientError` that fits."""
    if len(text) > max_bytes or (len(text) * 4 > max_bytes and len(text.encode()) > max_bytes):
        raise MessageTooLarge(f"frame exceeds {max_bytes} bytes")
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise InvalidJSON(f"frame is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise InvalidMessage(f"a frame must be a JSON object, not {_json_kind(data)}")
    kind = data.get("type")
    if not isinstance(kind, str):
        raise InvalidMessage("frame has no string field 'type'")
    if kind == "user_message":
        body = data.get("text")
        if not isinstance(body, str):
            raise InvalidMessage("user_message needs a string field 'text'")
        if not body.strip():
            raise InvalidMessage("user_message 'text' must not be empty")
        if len(data) == 2:
            return UserMessage(body)  # the common frame: type and text alone
        response_id = None if data.get("response_id") is None else _response_id(data)
        return UserMessage(body, response_id, _interrupt(data), _tool_choice(data), _trace(data))
    if kind == "tool_result":
        return _parse_tool_result(data)
    if kind == "truncate":
        heard = data.get("heard_chars")
        if type(heard) is not int or not 0 <= heard < 2**53:
            raise InvalidMessage("truncate needs an integer field 'heard_chars' (0 or more)")
        return Truncate(_response_id(data), heard)
    if kind == "start_session":
        return _parse_config(data.get("config"))
    if kind == "resume":
        return _parse_resume(data)
    simple = _SIMPLE.get(kind)
    if simple is None:
        raise InvalidMessage(
            f"unknown frame type {kind[:64]!r}; expected one of: {', '.join(KNOWN_TYPES)}"
        )
    return simple


def _parse_config(raw: Any) -> StartSession:
    if raw is None:
        return StartSession(ConfigUpdate())
    if not isinstance(raw, dict):
        raise InvalidConfig(f"'config' must be an object, not {_json_kind(raw)}")
    try:
        config = ConfigUpdate.model_validate(raw)
    except ValidationError as exc:
        raise InvalidConfig(f"invalid config: {describe(exc)}") from exc
    known = ConfigUpdate.model_fields
    ignored = tuple(str(name)[:64] for name in raw if name not in known)
    return StartSession(config, ignored[:32])


def _parse_resume(data: dict[str, Any]) -> Resume:
    session_id, token, last_seq = (data.get(k) for k in ("session_id", "resume_token", "last_seq"))
    if not isinstance(session_id, str) or not 0 < len(session_id) <= _MAX_ID:
        raise InvalidMessage("resume needs a string field 'session_id'")
    if not isinstance(token, str) or not 0 < len(token) <= _MAX_ID:
        raise InvalidMessage("resume needs a string field 'resume_token'")
    if type(last_seq) is not int or not -1 <= last_seq < 2**53:
        raise InvalidMessage("resume needs an integer field 'last_seq' (-1 when none was seen)")
    return Resume(session_id, token, last_seq)


def _parse_tool_result(data: dict[str, Any]) -> ToolResult:
    results = data.get("results")
    if not isinstance(results, list) or not 0 < len(results) <= MAX_TOOL_RESULTS:
        raise InvalidMessage(
            f"tool_result needs a field 'results': a list of 1 to {MAX_TOOL_RESULTS} "
            "objects with 'id' and 'content'"
        )
    parsed = []
    for result in results:
        call_id = result.get("id") if isinstance(result, dict) else None
        if not isinstance(call_id, str) or not 0 < len(call_id) <= _MAX_ID:
            raise InvalidMessage("each tool_result result needs a string field 'id'")
        if "content" not in result:
            raise InvalidMessage(f"the tool_result for {call_id!r} has no 'content'")
        content = result["content"]
        text = content if isinstance(content, str) else orjson.dumps(content).decode()
        parsed.append((call_id, text))
    response_id = None if data.get("response_id") is None else _response_id(data)
    return ToolResult(tuple(parsed), response_id, _tool_choice(data), _trace(data))


def _trace(data: dict[str, Any]) -> Parent | None:
    """`trace`: a W3C `traceparent`, or an object with `traceparent` and `tracestate`."""
    value: Any = data.get("trace")
    if value is None:
        return None
    state: Any = None
    if isinstance(value, dict):
        value, state = value.get("traceparent"), value.get("tracestate")
    good_state = state is None or (isinstance(state, str) and len(state) <= _MAX_TRACESTATE)
    if isinstance(value, str) and TRACEPARENT.match(value.strip().lower()) and good_state:
        return Parent(value.strip().lower(), state or None)
    raise InvalidMessage(
        f"{data['type']} 'trace' must be a W3C traceparent (\"00-<32 hex>-<16 hex>-<2 hex>\", "
        f"not all zeros) or an object with it as 'traceparent' and an optional string "
        f"'tracestate' (at most {_MAX_TRACESTATE} characters)"
    )


def _tool_choice(data: dict[str, Any]) -> ToolChoice | None:
    value = data.get("tool_choice")
    if value is None:
        return None
    if value in ("auto", "none", "required"):
        return str(value)
    try:
        forced = ForcedTool.model_validate(value)
    except ValidationError as exc:
        raise InvalidMessage(
            f'{data["type"]} \'tool_choice\' must be "auto", "none", "required" or '
            '{"type": "function", "function": {"name": ...}}'
        ) from exc
    return {"type": "function", "function": {"name": forced.function.name}}


def _response_id(data: dict[str, Any]) -> str:
    value = data.get("response_id")
    if not isinstance(value, str) or not 0 < len(value) <= MAX_RESPONSE_ID:
        raise InvalidMessage(
            f"{data['type']} 'response_id' must be a string of 1 to {MAX_RESPONSE_ID} characters"
        )
    return value


def _interrupt(data: dict[str, Any]) -> bool:
    value = data.get("interrupt", False)
    if not isinstance(value, bool):
        raise InvalidMessage("user_message 'interrupt' must be true or false")
    return value


def _json_kind(value: Any) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, dict):
        return "an object"
    return "a number"


# ---- server frames ------------------------------------------------------------------------
# Each takes the frame's `seq` first (None only for a refusal before any session exists).


def _encode(frame: dict[str, Any], seq: int | None) -> str:
    if seq is not None:
        frame["seq"] = seq
    return orjson.dumps(frame).decode()


def token(seq: int, text: str) -> str:
    return orjson.dumps({"type": "token", "data": text, "seq": seq}).decode()


def session_started(seq: int, session_id: str, resume_token: str) -> str:
    frame = {"type": "session_started", "session_id": session_id, "resume_token": resume_token}
    return _encode(frame, seq)


def session_resumed(session_id: str, last: int, replayed: int, generating: bool) -> str:
    """Not itself a frame of the session's stream: `seq` says where the replay ends."""
    frame = {
        "type": "session_resumed",
        "session_id": session_id,
        "seq": last,
        "replayed": replayed,
        "generating": generating,
    }
    return orjson.dumps(frame).decode()


def session_configured(
    seq: int, session_id: str, config: SessionConfig, ignored: Sequence[str]
) -> str:
    frame = {
        "type": "session_configured",
        "session_id": session_id,
        "config": config_body(config),
        "ignored_fields": list(ignored),
    }
    return _encode(frame, seq)


def response_complete(seq: int, stats: TurnStats, response_id: str) -> str:
    frame = {"type": "response_complete", "response_id": response_id, "stats": stats_body(stats)}
    return _encode(frame, seq)


def cancelled(
    seq: int,
    stats: TurnStats | None,
    frames_after_cancel: int = 0,
    response_id: str | None = None,
) -> str:
    """`cancelled`: with the stopped turn's stats, or `success: false` when none ran."""
    if stats is None:
        return _encode({"type": "cancelled", "success": False}, seq)
    body = stats_body(stats)
    # the promise: at most one more token frame once the cancel was read (with chunking,
    # and the piece held then flushed as one more)
    body["token_frames_after_cancel"] = frames_after_cancel
    frame = {"type": "cancelled", "success": True, "response_id": response_id, "stats": body}
    return _encode(frame, seq)


def tool_call(seq: int, response_id: str, calls: Sequence[ToolCall]) -> str:
    body = [{"id": c.id, "name": c.name, "arguments": c.arguments} for c in calls]
    return _encode({"type": "tool_call", "response_id": response_id, "calls": body}, seq)


def truncated(seq: int, response_id: str, kept_chars: int) -> str:
    frame = {"type": "truncated", "response_id": response_id, "kept_chars": kept_chars}
    return _encode(frame, seq)


def session_ended(seq: int, session_id: str, summary: SessionSummary) -> str:
    frame = {"type": "session_ended", "session_id": session_id, "stats": asdict(summary)}
    return _encode(frame, seq)


def history(seq: int, session_id: str, entries: Sequence[Entry]) -> str:
    frame = {"type": "history", "session_id": session_id, "messages": messages(entries)}
    return _encode(frame, seq)


def error(seq: int | None, exc: ServiceError) -> str:
    frame: dict[str, Any] = {"type": "error", "error": error_body(exc)}
    if exc.response_id is not None:  # the error ends (or refused) that reply
        frame["response_id"] = exc.response_id
    return _encode(frame, seq)


# The frame types that end a turn: what a replica following another's reply waits for.
TURN_ENDS = frozenset({"response_complete", "cancelled", "error"})


def http_refusal(exc: ServiceError) -> JSONResponse:
    """The HTTP answer to a request refused before it is served (no key, throttled)."""
    headers = {"WWW-Authenticate": "Bearer"} if exc.http_status == 401 else {}
    if exc.retry_after_ms is not None:
        headers["Retry-After"] = str(max(1, round(exc.retry_after_ms / 1000)))
    return JSONResponse({"error": error_body(exc)}, status_code=exc.http_status, headers=headers)


# ---- the parts of frames ------------------------------------------------------------------


def error_body(exc: ServiceError) -> dict[str, Any]:
    """The `error` object of an error frame (and of an HTTP refusal's body)."""
    body: dict[str, Any] = {
        "code": exc.code,
        "message": exc.message,
        "severity": exc.severity,
        "recoverable": exc.recoverable,
    }
    if exc.retry_after_ms is not None:
        body["retry_after_ms"] = exc.retry_after_ms
    return body


def config_body(config: SessionConfig) -> dict[str, Any]:
    body: dict[str, Any] = {
        "system_prompt": config.system_prompt,
        "chunking": config.chunking,
        "tools": list(config.tools),
        "tool_choice": config.tool_choice,
    }
    body.update(config.sampling.model_dump())
    body["stop"] = list(config.sampling.stop)
    return body


def stats_body(stats: TurnStats) -> dict[str, Any]:
    return {
        k: (round(v, 2) if isinstance(v, float) else v)
        for k, v in asdict(stats).items()
        if v is not None
    }


def messages(entries: Sequence[Entry]) -> list[dict[str, Any]]:
    """History entries as `{"role", "content"}`, with `status` on the assistant's."""
    out: list[dict[str, Any]] = []
    for entry in entries:
        message: dict[str, Any] = {"role": entry.role, "content": entry.content}
        if entry.role == "assistant":
            message["status"] = entry.status
            if entry.response_id is not None:
                message["response_id"] = entry.response_id
            if entry.tool_calls:
                message["tool_calls"] = [
                    {"id": c.id, "name": c.name, "arguments": c.arguments} for c in entry.tool_calls
                ]
        elif entry.role == "tool":
            message["tool_call_id"] = entry.tool_call_id
            message["name"] = entry.tool_name
        out.append(message)
    return out
