"""A fake Ollama: a real HTTP server on 127.0.0.1 speaking Ollama's documented API.

It serves `/`, `/api/version`, `/api/tags`, `/api/show`, `/api/pull` and `/api/chat` (NDJSON
stream ending with a `done` line and its counters, or one JSON object with `stream: false`),
records every chat request it receives and when the client closed it, and fails on demand the
ways the real one does: 404 for an unknown model, any HTTP error status with Ollama's
`{"error": ...}` body (or a body that is not JSON, as a proxy in front of it sends), an in-band
error line mid-stream, a line that is not JSON, a dropped connection, a stall, a slow stream, a
body left open after the `done` line, a stream held at a chunk until the test releases it, a
stalled `/api/version`, a failed pull (an error status, or a body the test writes), and
refused connections (`refuse()` closes the listening socket, `accept()` reopens it on the
same port).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

DEFAULT_MODEL = "llama3.2:1b"


@dataclass
class Reply:
    """How the fake answers one `/api/chat` request."""

    chunks: list[str] = field(default_factory=lambda: ["Hello", ",", " world", "!"])
    delay: float = 0.0  # before each chunk after the first
    first_delay: float = 0.0  # before the first chunk (prompt evaluation)
    header_delay: float = 0.0  # before the response headers (model loading)
    status: int = 200  # != 200: answer this status with {"error": error}
    error: str = "something went wrong"
    error_body: bytes | None = None  # with status != 200: this body, as text/html, instead
    error_after: int | None = None  # send an in-band {"error"} line after this many chunks
    drop_after: int | None = None  # drop the connection after this many chunks
    stall_after: int | None = None  # stop sending after this many chunks, until the client goes
    garbage_after: int | None = None  # after this many chunks, a line that is not JSON; a stall
    garbage: bytes = b"<html>502 Bad Gateway</html>"  # that line (JSON not an object, say)
    blank_lines: bool = False  # an empty line before each chunk's (NDJSON readers skip them)
    gate: asyncio.Event | None = None  # wait for this before the chunk at index gate_at
    gate_at: int = 1
    hold_open: bool = False  # after the done line, leave the body open until the client goes
    eval_count: int | None = None  # default: fake_token_count of the reply text
    eval_duration: int | None = 200_000_000  # ns; None: left out of the done line
    prompt_eval_count: int | None = None  # default: fake_token_count(messages)
    # Of prompt_eval_count, the tokens Ollama took from its prompt cache (0.33+ sends it).
    prompt_eval_cached_count: int | None = None
    omit_counts: bool = False  # leave the counters out of the done line
    omit_done: bool = False  # end the stream cleanly but without the done line
    done_reason: str = "stop"
    # After the text: `message.tool_calls` as Ollama sends them ({"function": {"name",
    # "arguments": {...}}}, sent as given, so a test can make them malformed), in one line,
    # or a line each (as Ollama streams calls it parses one after another).
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    tool_calls_apart: bool = False


def ollama_call(name: str, arguments: Any) -> dict[str, Any]:
    """One entry of a `Reply`'s `tool_calls`, as Ollama sends a call (it gives no id)."""
    return {"function": {"name": name, "arguments": arguments}}


@dataclass
class ChatRecord:
    """One `/api/chat` request as the fake saw it."""

    body: dict[str, Any]
    headers: dict[str, str]
    started_at: float
    peer: tuple[str, int] | None = None  # the client's address: the same on a reused connection
    chunks_sent: int = 0
    finished_at: float | None = None  # the fake ended the response itself
    closed_at: float | None = None  # the client closed it before the fake was done
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def messages(self) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = self.body.get("messages", [])
        return messages

    @property
    def options(self) -> dict[str, Any]:
        options: dict[str, Any] = self.body.get("options") or {}
        return options

    async def wait_closed(self, limit: float) -> float:
        """Wait until the client closed this response; return when (perf_counter time)."""
        await asyncio.wait_for(self.closed.wait(), limit)
        assert self.closed_at is not None
        return self.closed_at


def fake_tokens(text: str) -> int:
    """The fake's stand-in for a tokenizer: 4 characters a token."""
    return math.ceil(len(text) / 4)


def fake_token_count(messages: list[dict[str, Any]]) -> int:
    """A prompt's size by the fake's tokenizer: 4 more per message, 3 to open the reply."""
    return sum(fake_tokens(str(m.get("content", ""))) + 4 for m in messages) + 3


class FakeOllama:
    """An in-process Ollama stand-in; use as `async with FakeOllama() as fake:`."""

    def __init__(self, models: tuple[str, ...] = (DEFAULT_MODEL,), version: str = "0.12.6"):
        self.models = list(models)
        self.version = version
        self.default_reply = Reply()
        self.replies: deque[Reply] = deque()
        self.chats: list[ChatRecord] = []
        self.hits: dict[str, int] = {}
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._chat_arrived = asyncio.Condition()
        self.version_gate: asyncio.Event | None = None  # /api/version waits for it when set
        self.tags_gate: asyncio.Event | None = None  # /api/tags waits for it when set
        self.tags_body: bytes | None = None  # /api/tags answers this, as sent, when set
        self.pulls: list[dict[str, Any]] = []  # the /api/pull request bodies, in order
        # How /api/pull answers, where a test sets it: this status with {"error": pull_error}
        # (when not 200), else this body as sent (NDJSON lines, malformed ones included),
        # else the default progress of a pull that succeeds.
        self.pull_status = 200
        self.pull_error = "something went wrong"
        self.pull_body: bytes | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def script(self, *replies: Reply) -> None:
        """Answer the next chat requests with these replies, then with `default_reply`."""
        self.replies.extend(replies)

    async def __aenter__(self) -> FakeOllama:
        app = web.Application()
        app.router.add_get("/", self._root)
        app.router.add_get("/api/version", self._version)
        app.router.add_get("/api/tags", self._tags)
        app.router.add_post("/api/show", self._show)
        app.router.add_post("/api/pull", self._pull)
        app.router.add_post("/api/chat", self._chat)
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
        # As when Ollama stops: the pooled keep-alive connections drop too.
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

    def _hit(self, request: web.Request) -> None:
        self.hits[request.path] = self.hits.get(request.path, 0) + 1

    async def _root(self, request: web.Request) -> web.Response:
        self._hit(request)
        return web.Response(text="Ollama is running")

    async def _version(self, request: web.Request) -> web.Response:
        self._hit(request)
        if self.version_gate is not None:
            await self.version_gate.wait()
        return web.json_response({"version": self.version})

    async def _tags(self, request: web.Request) -> web.Response:
        self._hit(request)
        if self.tags_gate is not None:
            await self.tags_gate.wait()
        if self.tags_body is not None:
            return web.Response(body=self.tags_body, content_type="application/json")
        models = [
            {
                "name": m,
                "model": m,
                "size": 1_321_098_329,
                "digest": "a" * 64,
                "details": {
                    "format": "gguf",
                    "family": "llama",
                    "parameter_size": "1.2B",
                    "quantization_level": "Q8_0",
                },
            }
            for m in self.models
        ]
        return web.json_response({"models": models})

    async def _show(self, request: web.Request) -> web.Response:
        self._hit(request)
        body = await request.json()
        name = body.get("model") or body.get("name")
        if name not in self.models:
            return _error(404, f'model "{name}" not found')
        return web.json_response(
            {"details": {"family": "llama"}, "model_info": {"llama.context_length": 131072}}
        )

    async def _pull(self, request: web.Request) -> web.StreamResponse:
        self._hit(request)
        body = await request.json()
        self.pulls.append(body)
        if self.pull_status != 200:
            return _error(self.pull_status, self.pull_error)
        name = str(body.get("model") or body.get("name"))
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        if self.pull_body is not None:
            await response.write(self.pull_body)
            await response.write_eof()
            return response
        await _line(response, {"status": "pulling manifest"})
        total = 4_000_000
        for done in range(0, total + 1, 1_000_000):
            await _line(
                response,
                {
                    "status": "pulling " + "b" * 12,
                    "digest": "sha256:" + "b" * 64,
                    "total": total,
                    "completed": done,
                },
            )
        if name not in self.models:
            self.models.append(name)
        await _line(response, {"status": "success"})
        await response.write_eof()
        return response

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        self._hit(request)
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "invalid character in request body")
        if not isinstance(body, dict) or not isinstance(body.get("messages", []), list):
            return _error(400, "invalid request")
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
            return _error(404, f'model "{model}" not found, try pulling it first')
        if reply.status != 200:
            if reply.error_body is not None:
                return web.Response(
                    status=reply.status, body=reply.error_body, content_type="text/html"
                )
            return _error(reply.status, reply.error)
        messages = record.messages
        if record.body.get("stream") is False:
            content = "".join(reply.chunks)
            return web.json_response(
                {**self._message(model, content, False), **self._counters(reply, messages)}
            )
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        for index, chunk in enumerate(reply.chunks):
            if index == reply.error_after:
                await _line(response, {"error": reply.error})
                return await self._finish(response, record)
            if index == reply.drop_after:
                assert request.transport is not None
                request.transport.abort()
                record.finished_at = time.perf_counter()
                return response
            if index == reply.stall_after:
                await asyncio.Event().wait()  # until the client goes and the handler is cancelled
            if index == reply.garbage_after:
                await response.write(reply.garbage + b"\n")
                await asyncio.Event().wait()  # then nothing more, until the client goes
            if reply.gate is not None and index == reply.gate_at:
                await reply.gate.wait()
            pause = reply.first_delay if index == 0 else reply.delay
            if pause:
                await asyncio.sleep(pause)
            if reply.blank_lines:
                await response.write(b"\n")
            await _line(response, self._message(model, chunk, False))
            record.chunks_sent += 1
        groups = [[c] for c in reply.tool_calls] if reply.tool_calls_apart else [reply.tool_calls]
        for calls in groups if reply.tool_calls else ():
            line = self._message(model, "", False)
            line["message"]["tool_calls"] = calls
            await _line(response, line)
        if reply.omit_done:
            return await self._finish(response, record)
        done = {
            **self._message(model, "", True),
            "done_reason": reply.done_reason,
            **self._counters(reply, messages),
        }
        await _line(response, done)
        if reply.hold_open:
            await asyncio.Event().wait()  # until the client goes and the handler is cancelled
        return await self._finish(response, record)

    async def _finish(self, response: web.StreamResponse, record: ChatRecord) -> web.StreamResponse:
        await response.write_eof()
        record.finished_at = time.perf_counter()
        return response

    @staticmethod
    def _message(model: Any, content: str, done: bool) -> dict[str, Any]:
        return {
            "model": model,
            "created_at": "2026-11-25T12:00:00.000000Z",
            "message": {"role": "assistant", "content": content},
            "done": done,
        }

    @staticmethod
    def _counters(reply: Reply, messages: list[dict[str, Any]]) -> dict[str, Any]:
        if reply.omit_counts:
            return {}
        eval_count = reply.eval_count
        if eval_count is None:
            eval_count = fake_tokens("".join(reply.chunks))
        prompt = reply.prompt_eval_count
        counts = {
            "total_duration": 250_000_000,
            "load_duration": 10_000_000,
            "prompt_eval_count": fake_token_count(messages) if prompt is None else prompt,
            "prompt_eval_duration": 40_000_000,
            "eval_count": eval_count,
        }
        if reply.eval_duration is not None:
            counts["eval_duration"] = reply.eval_duration
        if reply.prompt_eval_cached_count is not None:
            counts["prompt_eval_cached_count"] = reply.prompt_eval_cached_count
        return counts


async def _line(response: web.StreamResponse, data: dict[str, Any]) -> None:
    await response.write(orjson.dumps(data) + b"\n")


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)
