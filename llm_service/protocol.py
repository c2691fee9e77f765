"""The wire frames of `/ws/llm`: client frames parsed in, server frames serialised out.

Parsing is strict and total: any text a client sends either becomes one of the typed frames
below or raises the `ClientError` that names what is wrong (`invalid_json`, `invalid_message`,
`invalid_config`, `message_too_large`). Unknown fields are ignored, as PROTOCOL.md requires.
Server frames are built here too, so the shape of every frame lives in one file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llm_service.errors import InvalidConfig, InvalidJSON, InvalidMessage, MessageTooLarge


class ConfigUpdate(BaseModel):
    """The `config` of a `start_session` frame: every field optional, types checked strictly."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)

    system_prompt: str | None = Field(None, max_length=200_000)
    temperature: float | None = Field(None, ge=0, le=2)
    max_tokens: int | None = Field(None, ge=1)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=0)
    repeat_penalty: float | None = Field(None, ge=0, le=10)
    min_p: float | None = Field(None, ge=0, le=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    seed: int | None = Field(None, ge=-(2**31), lt=2**31)
    stop: list[str] | None = Field(None, max_length=16)


@dataclass(frozen=True, slots=True)
class StartSession:
    config: ConfigUpdate


@dataclass(frozen=True, slots=True)
class UserMessage:
    text: str


@dataclass(frozen=True, slots=True)
class Cancel:
    pass


@dataclass(frozen=True, slots=True)
class EndSession:
    pass


@dataclass(frozen=True, slots=True)
class GetHistory:
    pass


ClientFrame = StartSession | UserMessage | Cancel | EndSession | GetHistory

_SIMPLE: dict[str, ClientFrame] = {
    "cancel": Cancel(),
    "end_session": EndSession(),
    "get_history": GetHistory(),
}
KNOWN_TYPES = ("start_session", "user_message", *_SIMPLE)


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
        return UserMessage(body)
    if kind == "start_session":
        return StartSession(_parse_config(data.get("config")))
    simple = _SIMPLE.get(kind)
    if simple is None:
        raise InvalidMessage(
            f"unknown frame type {kind[:64]!r}; expected one of: {', '.join(KNOWN_TYPES)}"
        )
    return simple


def _parse_config(raw: Any) -> ConfigUpdate:
    if raw is None:
        return ConfigUpdate()
    if not isinstance(raw, dict):
        raise InvalidConfig(f"'config' must be an object, not {_json_kind(raw)}")
    try:
        return ConfigUpdate.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()[:5]
        )
        raise InvalidConfig(f"invalid config: {problems}") from exc


def _json_kind(value: Any) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return "a number"


def dumps(frame: dict[str, Any]) -> str:
    """Serialise a server frame."""
    return orjson.dumps(frame).decode()


def token_frame(text: str) -> str:
    return orjson.dumps({"type": "token", "data": text}).decode()
