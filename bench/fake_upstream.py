"""A fast fake engine for the benchmarks, run as its own process so its CPU stays out of the
measured ones: `python bench/fake_upstream.py --port P`.

It speaks `/api/chat` as Ollama does (HTTP/1.1, chunked NDJSON, one line per token, then the
final `{"done": true, "done_reason": "stop", "eval_count": N, ...}` line), plus `/`,
`/api/version` and `/api/tags` (listing `llama3.2:1b`) for the service's health probe. It also
speaks the OpenAI-compatible API as vLLM does: `GET /v1/models` and `POST /v1/chat/completions`
with `"stream": true`, answered as `text/event-stream`: a role chunk, one
`data: {chat.completion.chunk}` event per token (the same words, pacing and batching as the
NDJSON lines; `max_tokens` or `max_completion_tokens` caps the reply as `num_predict` does, with
`finish_reason` `length`), a finish chunk, a usage chunk when `stream_options.include_usage`,
then `data: [DONE]`. It is a raw asyncio protocol on uvloop with httptools parsing, so a token
costs it a few microseconds.

What a reply looks like comes from the request, so one fake serves every scenario: the last
user message may hold `key=value` words, read anywhere in its text:

    tokens=N    reply with N tokens (default 10); `options.num_predict` caps it as in Ollama,
                and then `done_reason` is `length`
    rate=R      R tokens a second, on an absolute schedule from the request's arrival (the
                first token at once); 0, the default, is as fast as the client reads, several
                lines a write (each its own NDJSON line) under TCP flow control
    id=X        a name for this request, for the closure report below
    sid=S       the session this turn belongs to: `/_bench/stats` counts chats by it
    delay=D     D seconds before answering at all, headers included (0, the default), as an
                engine busy with the prompt

Closure report, for cancel latency: when a client closes a connection while a chat response
on it is still streaming, the fake notes `time.monotonic()` at once (in `eof_received` or
`connection_lost`, whichever the loop calls first). `GET /_bench/closed?id=X&wait=S` answers
`{"id": X, "closed_at": T}`, waiting up to S seconds for the closure (`closed_at` null if it
has not happened). T is CLOCK_MONOTONIC, which on Linux is one system-wide clock, so the
benchmark compares it with its own `time.monotonic()` taken when it sent `cancel`.
`GET /_bench/stats` counts connections, chats, completed replies and closures, and chats by
`sid` (`by_session`).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import formatdate
from typing import Any, cast
from urllib.parse import parse_qs, urlsplit

import httptools
import orjson

MODEL = "llama3.2:1b"
VERSION = "0.12.6"
LINES_PER_WRITE = 16  # unpaced replies: lines batched into one chunk of the HTTP response
_PARAM = re.compile(r"\b(tokens|rate|id|sid|delay)=(\S+)")
_WORDS = (" the", " quick", " brown", " fox", " jumps", " over", " a", " lazy", " dog", ".")


@dataclass
class Plan:
    """One chat reply: how many tokens, how fast, under which name."""

    tokens: int = 10
    rate: float = 0.0
    request_id: str = ""
    done_reason: str = "stop"
    prompt_tokens: int = 0
    session: str = ""
    delay: float = 0.0

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> Plan:
        """An Ollama `/api/chat` request's reply."""
        return cls._read(body, (body.get("options") or {}).get("num_predict"))

    @classmethod
    def from_openai(cls, body: dict[str, Any]) -> Plan:
        """An OpenAI `/v1/chat/completions` request's reply."""
        return cls._read(body, body.get("max_completion_tokens", body.get("max_tokens")))

    @classmethod
    def _read(cls, body: dict[str, Any], limit: object) -> Plan:
        messages = body.get("messages") or []
        users = [str(m.get("content", "")) for m in messages if m.get("role") == "user"]
        params = dict(_PARAM.findall(users[-1])) if users else {}
        plan = cls(
            tokens=int(params.get("tokens", 10)),
            rate=float(params.get("rate", 0)),
            request_id=params.get("id", ""),
            prompt_tokens=sum(len(str(m.get("content", ""))) // 4 + 4 for m in messages),
            session=params.get("sid", ""),
            delay=float(params.get("delay", 0)),
        )
        if isinstance(limit, int) and 0 < limit < plan.tokens:
            plan.tokens, plan.done_reason = limit, "length"
        return plan


@dataclass
class Board:
    """What the fake reports about itself: closures by request id, and counts."""

    closed: dict[str, float] = field(default_factory=dict)
    waiters: dict[str, list[asyncio.Future[float]]] = field(default_factory=dict)
    connections: int = 0
    chats: int = 0
    completed: int = 0
    by_session: dict[str, int] = field(default_factory=dict)

    def record_chat(self, plan: Plan) -> None:
        self.chats += 1
        if plan.session:
            self.by_session[plan.session] = self.by_session.get(plan.session, 0) + 1

    def record_closed(self, request_id: str, when: float) -> None:
        self.closed[request_id] = when
        for waiter in self.waiters.pop(request_id, []):
            if not waiter.done():
                waiter.set_result(when)

    async def wait_closed(self, request_id: str, limit: float) -> float | None:
        if request_id in self.closed or limit <= 0:
            return self.closed.get(request_id)
        waiter = asyncio.get_running_loop().create_future()
        self.waiters.setdefault(request_id, []).append(waiter)
        try:
            return await asyncio.wait_for(waiter, limit)
        except TimeoutError:
            return None


class FakeOllamaProtocol(asyncio.Protocol):
    """One HTTP/1.1 connection: requests answered one after another (keep-alive)."""

    def __init__(self, board: Board) -> None:
        self.board = board
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.pending: deque[tuple[str, str, bytes, bool]] = deque()
        self.worker: asyncio.Task[None] | None = None
        self.streaming: str | None = None  # the id of the chat reply being written, if any
        self.gone = False
        self.writable = asyncio.Event()
        self.writable.set()
        self._url = b""
        self._body: list[bytes] = []

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.board.connections += 1

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._write_simple(400, {"error": "bad request"}, keep_alive=False)

    def eof_received(self) -> bool:
        self._gone()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._gone()
        self.writable.set()
        if self.worker is not None:
            self.worker.cancel()

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def _gone(self) -> None:
        if self.gone:
            return
        self.gone = True
        if self.streaming is not None:
            self.board.record_closed(self.streaming, time.monotonic())

    # httptools callbacks
    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        method = self.parser.get_method().decode()
        self.pending.append(
            (method, self._url.decode(), b"".join(self._body), self.parser.should_keep_alive())
        )
        self._url, self._body = b"", []
        if self.worker is None or self.worker.done():
            self.worker = asyncio.get_running_loop().create_task(self._serve())

    async def _serve(self) -> None:
        while self.pending and not self.gone:
            method, url, body, keep_alive = self.pending.popleft()
            await self._route(method, url, body, keep_alive)

    async def _route(self, method: str, url: str, body: bytes, keep_alive: bool) -> None:
        parts = urlsplit(url)
        path, query = parts.path, parse_qs(parts.query)
        if method == "POST" and path == "/api/chat":
            await self._chat(body, keep_alive)
        elif method == "POST" and path == "/v1/chat/completions":
            await self._completions(body, keep_alive)
        elif path == "/v1/models":
            models = [{"id": MODEL, "object": "model", "created": 1735689600, "owned_by": "fake"}]
            self._write_simple(200, {"object": "list", "data": models}, keep_alive)
        elif path == "/":
            self._write_simple(200, "Ollama is running", keep_alive)
        elif path == "/api/version":
            self._write_simple(200, {"version": VERSION}, keep_alive)
        elif path == "/api/tags":
            self._write_simple(200, {"models": [_model_entry(MODEL)]}, keep_alive)
        elif path == "/_bench/closed":
            request_id = query.get("id", [""])[0]
            wait = float(query.get("wait", ["0"])[0])
            when = await self.board.wait_closed(request_id, wait)
            self._write_simple(200, {"id": request_id, "closed_at": when}, keep_alive)
        elif path == "/_bench/stats":
            stats = {
                "connections": self.board.connections,
                "chats": self.board.chats,
                "completed": self.board.completed,
                "closed": len(self.board.closed),
                "by_session": self.board.by_session,
            }
            self._write_simple(200, stats, keep_alive)
        else:
            self._write_simple(404, {"error": f"no route for {method} {path}"}, keep_alive)

    async def _chat(self, raw: bytes, keep_alive: bool) -> None:
        try:
            body = orjson.loads(raw)
            plan = Plan.from_body(body)
        except (orjson.JSONDecodeError, ValueError, AttributeError, TypeError) as exc:
            self._write_simple(400, {"error": f"invalid request: {exc}"}, keep_alive)
            return
        if body.get("model") != MODEL:
            self._write_simple(404, {"error": f'model "{body.get("model")}" not found'}, keep_alive)
            return
        if not await self._accept(plan):
            return
        assert self.transport is not None
        self.transport.write(_head(200, "application/x-ndjson", None, keep_alive))
        started = time.monotonic_ns()
        created = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        prefix = b'{"model":"' + MODEL.encode() + b'","created_at":"' + created.encode() + b'",'

        def line(i: int) -> bytes:
            content = {"role": "assistant", "content": _WORDS[i % len(_WORDS)]}
            return prefix + orjson.dumps({"message": content, "done": False})[1:] + b"\n"

        def tail() -> bytes:
            elapsed = time.monotonic_ns() - started
            done = {
                "message": {"role": "assistant", "content": ""},
                "done_reason": plan.done_reason,
                "done": True,
                "total_duration": elapsed + 1_000_000,
                "load_duration": 1_000_000,
                "prompt_eval_count": plan.prompt_tokens,
                "prompt_eval_duration": 500_000,
                "eval_count": plan.tokens,
                "eval_duration": max(elapsed, 1),
            }
            return prefix + orjson.dumps(done)[1:] + b"\n"

        await self._stream(plan, keep_alive, b"", line, tail)

    async def _completions(self, raw: bytes, keep_alive: bool) -> None:
        try:
            body = orjson.loads(raw)
            plan = Plan.from_openai(body)
        except (orjson.JSONDecodeError, ValueError, AttributeError, TypeError) as exc:
            self._write_simple(400, _openai_error(f"invalid request: {exc}", 400), keep_alive)
            return
        if body.get("model") != MODEL:
            message = f"The model `{body.get('model')}` does not exist."
            self._write_simple(404, _openai_error(message, 404), keep_alive)
            return
        if body.get("stream") is not True:
            message = "this fake streams only: send stream: true"
            self._write_simple(400, _openai_error(message, 400), keep_alive)
            return
        if not await self._accept(plan):
            return
        assert self.transport is not None
        self.transport.write(_head(200, "text/event-stream; charset=utf-8", None, keep_alive))
        head = b'{"id":"chatcmpl-%d","object":"chat.completion.chunk","created":%d,' % (
            self.board.chats,
            int(time.time()),
        )
        head += b'"model":"%b",' % MODEL.encode()

        def event(choice: bytes, after: bytes = b"") -> bytes:
            return b'data: %b"choices":[%b]%b}\n\n' % (head, choice, after)

        role = event(b'{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}')
        words = [
            event(b'{"index":0,"delta":{"content":%b},"finish_reason":null}' % orjson.dumps(w))
            for w in _WORDS
        ]
        finish = event(b'{"index":0,"delta":{},"finish_reason":"%b"}' % plan.done_reason.encode())
        usage = {
            "prompt_tokens": plan.prompt_tokens,
            "completion_tokens": plan.tokens,
            "total_tokens": plan.prompt_tokens + plan.tokens,
        }
        wants_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        last = finish
        if wants_usage:
            last += event(b"", b',"usage":' + orjson.dumps(usage))
        last += b"data: [DONE]\n\n"
        await self._stream(plan, keep_alive, role, lambda i: words[i % len(words)], lambda: last)

    async def _accept(self, plan: Plan) -> bool:
        """Count the chat, wait out its `delay`; False when the client left meanwhile."""
        self.board.record_chat(plan)
        self.streaming = plan.request_id or f"chat-{self.board.chats}"
        if plan.delay > 0:
            await asyncio.sleep(plan.delay)
        return not self.gone

    async def _stream(
        self,
        plan: Plan,
        keep_alive: bool,
        lead: bytes,
        line: Callable[[int], bytes],
        tail: Callable[[], bytes],
    ) -> None:
        """Write the reply's body: `lead` with the first token, a unit per token (paced, or
        batched), then `tail` with the last batch and the end of the chunked body."""
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        start = loop.time()
        batch: list[bytes] = []
        for i in range(plan.tokens):
            unit = line(i)
            if lead:
                unit, lead = lead + unit, b""
            if plan.rate > 0:
                delay = start + i / plan.rate - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                await self._send_chunk(unit)
            else:
                batch.append(unit)
                if len(batch) >= LINES_PER_WRITE:
                    await self._send_chunk(b"".join(batch))
                    batch.clear()
            if self.gone:
                return
        batch.append(lead + tail())
        self.streaming = None  # a client closing after the done line cancels nothing
        self.board.completed += 1
        await self._send_chunk(b"".join(batch))
        if not self.gone:
            self.transport.write(b"0\r\n\r\n")
            if not keep_alive:
                self.transport.close()

    async def _send_chunk(self, data: bytes) -> None:
        if not self.writable.is_set():
            await self.writable.wait()
        if self.gone or self.transport is None:
            return
        self.transport.write(b"%x\r\n%b\r\n" % (len(data), data))
        # Unpaced replies: let the loop see a closing client between batches.
        await asyncio.sleep(0)

    def _write_simple(self, status: int, payload: object, keep_alive: bool) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        if isinstance(payload, str):
            body, kind = payload.encode(), "text/plain; charset=utf-8"
        else:
            body, kind = orjson.dumps(payload), "application/json; charset=utf-8"
        self.transport.write(_head(status, kind, len(body), keep_alive) + body)
        if not keep_alive:
            self.transport.close()


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found"}


def _head(status: int, kind: str, length: int | None, keep_alive: bool) -> bytes:
    framing = "Transfer-Encoding: chunked" if length is None else f"Content-Length: {length}"
    connection = "" if keep_alive else "Connection: close\r\n"
    return (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\nContent-Type: {kind}\r\n"
        f"Date: {formatdate(usegmt=True)}\r\n{framing}\r\n{connection}\r\n"
    ).encode()


def _openai_error(message: str, code: int) -> dict[str, Any]:
    kind = "NotFoundError" if code == 404 else "BadRequestError"
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def reply_text(tokens: int) -> str:
    """The text of a reply of `tokens` tokens, as the fake streams it."""
    return "".join(_WORDS[i % len(_WORDS)] for i in range(tokens))


def _model_entry(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "model": name,
        "modified_at": "2025-01-01T00:00:00Z",
        "size": 1_321_098_329,
        "digest": "a" * 64,
        "details": {
            "format": "gguf",
            "family": "llama",
            "parameter_size": "1.2B",
            "quantization_level": "Q8_0",
        },
    }


async def serve(host: str, port: int) -> None:
    """Serve until cancelled (SIGTERM or SIGINT end the process)."""
    board = Board()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: FakeOllamaProtocol(board), host, port, backlog=4096, reuse_address=True
    )
    async with server:
        print(f"fake_upstream listening on http://{host}:{port}", flush=True)
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description="A fast fake Ollama for the benchmarks.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=11434)
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args.host, args.port))
    else:
        uvloop.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
