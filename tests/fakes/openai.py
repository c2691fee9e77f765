"""A fake OpenAI-compatible engine: a real HTTP server on 127.0.0.1 speaking what vLLM, llama.cpp's
`llama-server` and llama-cpp-python's server speak.

It serves `GET /health` (outside `/v1`, as vLLM has it), `GET /v1/models` and
`POST /v1/chat/completions`: a `text/event-stream` of `data: {chat.completion.chunk}` events
(role chunk, one chunk per text piece, `delta.tool_calls` in pieces, a `finish_reason` chunk, a
usage chunk when `stream_options.include_usage` asked for one, then `data: [DONE]`), or one
`chat.completion` object without `"stream": true`. It records every chat request it receives and
when the client closed it, checks `Authorization: Bearer <api_key>` on `/v1` when given a key,
and fails on demand the ways the real ones do: 404 for an unknown model, 400 for a prompt over
the context length, any HTTP error status with the `{"error": {...}}` body (429 with
`Retry-After`), an in-band `data: {"error": ...}` event mid-stream, a dropped connection, a
stall, a slow stream, a stream without `[DONE]` or without usage, keep-alive comments, events
whose data spans two lines, and refused connections (`refuse()` closes the listening socket,
`accept()` reopens it on the same port).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from tests.fakes.ollama import fake_tokens

__all__ = ["ChatRecord", "FakeOpenAI", "Reply", "fake_prompt_tokens", "fake_tokens"]

DEFAULT_MODEL = "smollm2"
FRAGMENT = 8  # characters of tool-call arguments per streamed piece
CONTEXT_LENGTH_MESSAGE = (
    "This model's maximum context length is 2048 tokens. However, you requested 4096 tokens "
    "(3072 in the messages, 1024 in the completion). Please reduce the length of the messages "
    "or completion."
)
_ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    429: "RateLimitError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


@dataclass
class Reply:
    """How the fake answers one `/v1/chat/completions` request."""

    chunks: list[str] = field(default_factory=lambda: ["Hello", ",", " world", "!"])
    # Each {"id", "name", "arguments": a JSON string, possibly malformed}; streamed after the text.
    tool_calls: list[dict[str, str]] = field(default_factory=list)
    finish_reason: str | None = None  # default: "tool_calls" with tool calls, else "stop"
    delay: float = 0.0  # before each chunk after the first
    first_delay: float = 0.0  # before the first chunk (prompt evaluation)
    header_delay: float = 0.0  # before the response headers (model loading, queueing)
    status: int = 200  # != 200: answer this status with {"error": {"message": error, ...}}
    error: str = "something went wrong"
    context_length_error: bool = False  # answer 400 with vLLM's context-length message
    # Chunk counts below include the tool-call pieces, which follow the text chunks.
    error_after: int | None = None  # send an in-band {"error"} event after this many chunks
    drop_after: int | None = None  # drop the connection after this many chunks
    stall_after: int | None = None  # stop sending after this many chunks, until the client goes
    prompt_tokens: int | None = None  # default: fake_prompt_tokens(messages)
    completion_tokens: int | None = None  # default: fake_tokens of the text and tool calls
    omit_usage: bool = False  # no usage chunk even when include_usage asked for one
    omit_done: bool = False  # end the stream cleanly but without `data: [DONE]`
    # `data: [DONE]` after this many chunks, with no finish_reason: llama-cpp-python's server
    # cutting a reply short because another request arrived (its --interrupt_requests)
    interrupted_after: int | None = None
    keepalive_comments: bool = False  # a `: keep-alive` comment before each event
    multiline: bool = False  # each chunk's JSON split across two `data:` lines of one event


@dataclass
class ChatRecord:
    """One `/v1/chat/completions` request as the fake saw it."""

    body: dict[str, Any]
    headers: dict[str, str]
    started_at: float
    peer: tuple[str, int] | None = None  # the client's address: the same on a reused connection
    chunks_sent: int = 0  # content and tool-call chunks, not the role/finish/usage ones
    finished_at: float | None = None  # the fake ended the response itself
    closed_at: float | None = None  # the client closed it before the fake was done
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def messages(self) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = self.body.get("messages", [])
        return messages

    async def wait_closed(self, limit: float) -> float:
        """Wait until the client closed this response; return when (perf_counter time)."""
        await asyncio.wait_for(self.closed.wait(), limit)
        assert self.closed_at is not None
        return self.closed_at


def fake_prompt_tokens(messages: list[dict[str, Any]]) -> int:
    """A prompt's size by the fake's tokenizer: 4 more per message, 3 to open the reply."""
    return sum(fake_tokens(str(m.get("content") or "")) + 4 for m in messages) + 3


class FakeOpenAI:
    """An in-process OpenAI-compatible engine; use as `async with FakeOpenAI() as fake:`."""

    def __init__(self, models: tuple[str, ...] = (DEFAULT_MODEL,), api_key: str | None = None):
        self.models = list(models)
        self.api_key = api_key
        self.default_reply = Reply()
        self.replies: deque[Reply] = deque()
        self.chats: list[ChatRecord] = []
        self.hits: dict[str, int] = {}
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._chat_arrived = asyncio.Condition()

    @property
    def url(self) -> str:
        """The base URL clients are configured with, `/v1` included."""
        return f"http://127.0.0.1:{self.port}/v1"

    def script(self, *replies: Reply) -> None:
        """Answer the next chat requests with these replies, then with `default_reply`."""
        self.replies.extend(replies)

    async def __aenter__(self) -> FakeOpenAI:
        app = web.Application(middlewares=[self._gate()])
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._chat)
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        await self.accept()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    async def refuse(self) -> None:
        """Stop listening: new connections are refused until `accept()`."""
        if self._site is not None:
            await self._site.stop()
            self._site = None
        # As when the engine stops: the pooled keep-alive connections drop too.
        assert self._runner is not None and self._runner.server is not None
        for handler in self._runner.server.connections:
            handler.force_close()

    async def accept(self) -> None:
        """Listen again, on the same port as before."""
        assert self._runner is not None
        self._site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await self._site.start()
        server = self._site._server
        assert server is not None and server.sockets  # type: ignore[attr-defined]
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]

    async def wait_chats(self, count: int, limit: float = 5.0) -> ChatRecord:
        """Wait until `count` chat requests have arrived; return the last."""
        async with self._chat_arrived:
            await asyncio.wait_for(
                self._chat_arrived.wait_for(lambda: len(self.chats) >= count), limit
            )
        return self.chats[count - 1]

    def _gate(self) -> Middleware:
        @web.middleware
        async def gate(request: web.Request, handler: Handler) -> web.StreamResponse:
            self.hits[request.path] = self.hits.get(request.path, 0) + 1
            # As vLLM's --api-key: only the /v1 routes are guarded, /health stays open.
            guarded = self.api_key is not None and request.path.startswith("/v1")
            if guarded and request.headers.get("Authorization") != f"Bearer {self.api_key}":
                return _error(401, "Incorrect API key provided.")
            return await handler(request)

        return gate

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({})

    async def _models(self, request: web.Request) -> web.Response:
        data = [{"id": m, "object": "model", "owned_by": "fake"} for m in self.models]
        return web.json_response({"object": "list", "data": data})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "Expecting value: line 1 column 1 (char 0)")
        if not isinstance(body, dict) or not isinstance(body.get("messages", []), list):
            return _error(400, "Input should be a valid list: messages")
        peer = request.transport.get_extra_info("peername") if request.transport else None
        record = ChatRecord(
            peer=tuple(peer) if peer else None,
            body=body,
            headers=dict(request.headers),
            started_at=time.perf_counter(),
        )
        async with self._chat_arrived:
            self.chats.append(record)
            self._chat_arrived.notify_all()
        reply = self.replies.popleft() if self.replies else self.default_reply
        try:
            return await self._answer(request, record, reply)
        except (asyncio.CancelledError, ConnectionResetError):
            record.closed_at = time.perf_counter()
            record.closed.set()
            raise

    async def _answer(
        self, request: web.Request, record: ChatRecord, reply: Reply
    ) -> web.StreamResponse:
        model = record.body.get("model")
        if reply.header_delay:
            await asyncio.sleep(reply.header_delay)
        if model not in self.models:
            return _error(404, f"The model `{model}` does not exist.")
        if reply.context_length_error:
            return _error(400, CONTEXT_LENGTH_MESSAGE)
        if reply.status != 200:
            return _error(reply.status, reply.error)
        head = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
        }
        usage = _usage(reply, record.messages)
        if record.body.get("stream") is not True:
            return web.json_response(_completion(head, reply, usage))
        options = record.body.get("stream_options") or {}
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        head["object"] = "chat.completion.chunk"
        if include_usage:
            head["usage"] = None  # as OpenAI: every other chunk carries a null usage
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache",
            }
        )
        await response.prepare(request)
        await _event(response, reply, _chunk(head, {"role": "assistant", "content": ""}))
        deltas: list[dict[str, Any] | None] = [{"content": c} for c in reply.chunks]
        deltas += _tool_call_deltas(reply.tool_calls)
        for index, delta in enumerate([*deltas, None]):
            if index == reply.error_after:
                error = {"error": {"message": reply.error, "type": "server_error"}}
                await _event(response, reply, error)
                # vLLM still ends with [DONE] after an in-band error; llama-server does not.
                return await self._end(response, record, reply)
            if index == reply.interrupted_after:
                return await self._end(response, record, reply)
            if index == reply.drop_after:
                assert request.transport is not None
                request.transport.abort()
                record.finished_at = time.perf_counter()
                return response
            if index == reply.stall_after:
                await asyncio.Event().wait()  # until the client goes and the handler is cancelled
            if delta is None:
                break
            pause = reply.first_delay if index == 0 else reply.delay
            if pause:
                await asyncio.sleep(pause)
            await _event(response, reply, _chunk(head, delta))
            record.chunks_sent += 1
        await _event(response, reply, _chunk(head, {}, _finish_reason(reply)))
        if include_usage and not reply.omit_usage:
            await _event(response, reply, {**head, "choices": [], "usage": usage})
        return await self._end(response, record, reply)

    async def _end(
        self, response: web.StreamResponse, record: ChatRecord, reply: Reply
    ) -> web.StreamResponse:
        if not reply.omit_done:
            await _event(response, reply, b"[DONE]")
        await response.write_eof()
        record.finished_at = time.perf_counter()
        return response


def _finish_reason(reply: Reply) -> str:
    if reply.finish_reason is not None:
        return reply.finish_reason
    return "tool_calls" if reply.tool_calls else "stop"


def _usage(reply: Reply, messages: list[dict[str, Any]]) -> dict[str, int]:
    prompt = reply.prompt_tokens
    if prompt is None:
        prompt = fake_prompt_tokens(messages)
    completion = reply.completion_tokens
    if completion is None:
        calls = "".join(c.get("name", "") + c.get("arguments", "") for c in reply.tool_calls)
        completion = fake_tokens("".join(reply.chunks) + calls)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _chunk(
    head: dict[str, Any], delta: dict[str, Any], finish: str | None = None
) -> dict[str, Any]:
    return {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def _tool_call_deltas(calls: list[dict[str, str]]) -> list[dict[str, Any] | None]:
    """OpenAI's way: per call, a piece with id and name, then the arguments in fragments."""
    deltas: list[dict[str, Any] | None] = []
    for index, call in enumerate(calls):
        first = {
            "index": index,
            "id": call.get("id") or f"call_{index}",
            "type": "function",
            "function": {"name": call.get("name", ""), "arguments": ""},
        }
        deltas.append({"tool_calls": [first]})
        arguments = call.get("arguments", "")
        for start in range(0, len(arguments), FRAGMENT):
            piece = {"index": index, "function": {"arguments": arguments[start : start + FRAGMENT]}}
            deltas.append({"tool_calls": [piece]})
    return deltas


def _completion(head: dict[str, Any], reply: Reply, usage: dict[str, int]) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": "".join(reply.chunks)}
    if reply.tool_calls:
        message["content"] = message["content"] or None
        message["tool_calls"] = [
            {
                "id": call.get("id") or f"call_{index}",
                "type": "function",
                "function": {"name": call.get("name", ""), "arguments": call.get("arguments", "")},
            }
            for index, call in enumerate(reply.tool_calls)
        ]
    choice = {"index": 0, "message": message, "finish_reason": _finish_reason(reply)}
    completion = {**head, "choices": [choice]}
    if not reply.omit_usage:
        completion["usage"] = usage
    return completion


async def _event(response: web.StreamResponse, reply: Reply, data: dict[str, Any] | bytes) -> None:
    payload = data if isinstance(data, bytes) else orjson.dumps(data)
    if reply.multiline:
        # Split between the id and the object keys: never inside a string, so JSON survives the
        # newline that joins an event's data lines.
        cut = payload.find(b',"object":')
        if cut > 0:
            payload = payload[: cut + 1] + b"\ndata: " + payload[cut + 1 :]
    comment = b": keep-alive\n\n" if reply.keepalive_comments else b""
    await response.write(comment + b"data: " + payload + b"\n\n")


def _error(status: int, message: str) -> web.Response:
    kind = _ERROR_TYPES.get(status, "InternalServerError" if status >= 500 else "BadRequestError")
    headers = {"Retry-After": "1"} if status == 429 else None
    body = {"error": {"message": message, "type": kind, "code": status}}
    return web.json_response(body, status=status, headers=headers)
