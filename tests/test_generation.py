"""A reply in flight (`Generation`) over a fake session and socket: what reaches the socket,
what waits in the frame log, when the reply stops by itself, and how `settle` and `cancel`
wait for it. The session-level behaviours (resume, grace, stores) are tested over real
sockets in tests/test_sessions.py; these pin the reply's own rules one at a time."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import orjson
import pytest
from prometheus_client import generate_latest
from starlette.websockets import WebSocketDisconnect
from structlog.testing import capture_logs

from llm_service import protocol
from llm_service.conversation import Conversation, SessionConfig
from llm_service.errors import ServiceError, UpstreamError, UpstreamUnauthorized
from llm_service.generation import Generation, Socket, Streamed
from llm_service.metrics import Telemetry
from llm_service.sessions.framelog import FrameLog
from llm_service.sessions.store import Frame
from tests.fakes.backend import FakeBackend, Scripted
from tests.support import make_settings, metric, poll


class FakeSocket:
    """A connection that records the frames it took. A frame type in `hold` waits for its
    event before it is taken; `not_reading` closes the connection, as the real one does, so a
    held send then fails as a send to a closed socket."""

    def __init__(self) -> None:
        self.frames: list[dict[str, Any]] = []
        self.hold: dict[str, asyncio.Event] = {}
        self.closed = False
        self.gone_after: int | None = None  # sends that succeed before the client goes
        self.replies_ended = 0
        self.not_read = 0
        self.failures: list[ServiceError] = []
        self.crash_on: str | None = None  # a frame type whose send raises (a bug below)

    async def _send(self, text: str) -> None:
        frame = orjson.loads(text)
        if frame["type"] == self.crash_on:
            self.crash_on = None
            raise RuntimeError("a bug")
        gate = self.hold.get(frame["type"])
        if gate is not None:
            await gate.wait()
        if self.closed or (self.gone_after is not None and len(self.frames) >= self.gone_after):
            raise WebSocketDisconnect(1006)
        self.frames.append(frame)

    @property
    def send_text(self) -> Callable[[str], Awaitable[None]]:
        return self._send

    def reply_ended(self) -> None:
        self.replies_ended += 1

    def not_reading(self) -> None:
        self.not_read += 1
        self.closed = True
        for gate in self.hold.values():
            gate.set()

    def failed_for_good(self, error: ServiceError) -> None:
        self.failures.append(error)

    def taken_over(self) -> None:
        raise AssertionError("no resume in these tests")

    def types(self) -> list[str]:
        return [frame["type"] for frame in self.frames]


class FakeSession:
    """A session (`Streamed`) as registry.Session keeps one, without a registry or a store."""

    def __init__(self, buffer_frames: int = 64, *, shared: bool = False) -> None:
        self.log = FrameLog(buffer_frames)
        self.outbox: list[Frame] = []
        self.socket: Socket | None = None
        self.live = False
        self.shared = shared
        self.buffer_frames = buffer_frames
        self.published = 0
        self.replies_ended = 0

    def attach(self, socket: Socket, *, live: bool = True) -> None:
        self.socket, self.live = socket, live

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        return asyncio.get_running_loop().create_task(coro)

    def publish_soon(self) -> None:
        self.published += 1

    async def send(self, build: Callable[..., str], *args: Any) -> int:
        seq = self.log.next()
        text = build(seq, *args)
        self.log.keep(seq, text)
        if self.shared:
            self.outbox.append((seq, text))
        socket = self.socket
        if socket is not None and self.live:
            await socket.send_text(text)
            self.log.delivered = seq
        return seq

    def lost(self) -> None:
        self.live = False

    def overflowing(self) -> bool:
        return self.socket is None and self.log.undelivered() >= self.buffer_frames

    def reply_ended(self) -> None:
        self.replies_ended += 1


def conversation(backend: FakeBackend) -> Conversation:
    settings = make_settings()
    config = SessionConfig(settings.default_system_prompt, settings.default_sampling())
    return Conversation("s1", config, backend, 8192, Telemetry())


def paused_after_the_first_chunk(
    *chunks: str,
) -> tuple[FakeBackend, asyncio.Event, FakeSession, FakeSocket]:
    """An engine whose reply sends its first chunk, then waits for the gate returned before
    the next; and a session attached to a socket."""
    gate = asyncio.Event()
    backend = FakeBackend()
    backend.script.append(Scripted(list(chunks), gate=gate))
    session, socket = FakeSession(), FakeSocket()
    session.attach(socket)
    return backend, gate, session, socket


def reply(
    session: Streamed, telemetry: Telemetry | None = None, send_timeout_s: float = 30.0
) -> Generation:
    return Generation(session, telemetry or Telemetry(), send_timeout_s)


def statuses(conv: Conversation) -> list[str | None]:
    return [entry.status for entry in conv.entries if entry.role == "assistant"]


async def finish(generation: Generation) -> None:
    assert generation.task is not None
    await asyncio.wait_for(asyncio.shield(generation.task), 10)


async def test_frames_are_numbered_sent_and_marked_delivered() -> None:
    backend = FakeBackend()
    backend.script.append(Scripted(["Hel", "lo", "!"]))
    session, socket = FakeSession(), FakeSocket()
    session.attach(socket)
    generation = reply(session)
    with capture_logs() as logs:
        generation.start(conversation(backend).start_turn("Hi"))
        await finish(generation)
    assert socket.types() == ["token", "token", "token", "response_complete"]
    assert logs == [{"event": "turn_completed", "tokens": 3, "log_level": "info"}]
    assert [f["seq"] for f in socket.frames] == [0, 1, 2, 3]
    assert [f["data"] for f in socket.frames[:3]] == ["Hel", "lo", "!"]
    assert session.log.delivered == session.log.last == 3
    assert session.outbox == [] and session.published == 0  # not shared: nothing published
    assert session.replies_ended == 1 and not generation.busy


async def test_a_shared_session_publishes_every_token_frame_as_kept() -> None:
    backend = FakeBackend()
    backend.script.append(Scripted(["a", "b"]))
    session, socket = FakeSession(shared=True), FakeSocket()
    session.attach(socket)
    generation = reply(session)
    generation.start(conversation(backend).start_turn("Hi"))
    await finish(generation)
    assert session.outbox == session.log.after(-1)  # every frame, with its number, in order
    assert [orjson.loads(text)["type"] for _, text in session.outbox] == [
        "token",
        "token",
        "response_complete",
    ]
    assert session.published == 2  # each token asked for a publish (the batch is the store's)


async def test_frames_made_while_a_resume_replays_wait_in_the_log() -> None:
    """A socket attached but not yet live (its replay is being sent) gets no new frame
    directly: the frames go to the log, after the ones being replayed, in order."""
    backend = FakeBackend()
    backend.script.append(Scripted(["one", "two"]))
    session, socket = FakeSession(), FakeSocket()
    session.attach(socket, live=False)
    generation = reply(session)
    conv = conversation(backend)
    generation.start(conv.start_turn("Hi"))
    await finish(generation)
    assert socket.frames == []
    assert session.log.delivered == -1 and session.log.undelivered() == 3
    kept = session.log.after(-1)
    assert kept is not None
    assert [orjson.loads(text)["data"] for _, text in kept[:2]] == ["one", "two"]
    assert statuses(conv) == ["complete"]  # attached: the buffer's bound does not apply


async def test_a_detached_reply_stops_when_its_client_would_miss_frames() -> None:
    backend = FakeBackend()
    backend.script.append(Scripted([f"t{i}" for i in range(10)]))
    session = FakeSession(buffer_frames=3)
    generation = reply(session)
    conv = conversation(backend)
    with capture_logs() as logs:
        generation.start(conv.start_turn("Hi"))
        await finish(generation)
    assert session.log.last == 2  # three frames, the most the log holds for the client
    assert statuses(conv) == ["interrupted"]
    assert [e.content for e in conv.entries if e.role == "assistant"] == ["t0t1t2"]
    assert backend.closed_streams == 1  # the engine request is closed
    full = [entry for entry in logs if entry["event"] == "resume_buffer_full"]
    assert full == [{"event": "resume_buffer_full", "frames": 3, "log_level": "info"}]
    assert session.replies_ended == 1


async def test_a_send_to_a_gone_client_leaves_the_frames_in_the_log() -> None:
    backend = FakeBackend()
    backend.script.append(Scripted(["a", "b", "c"]))
    session, socket = FakeSession(), FakeSocket()
    socket.gone_after = 1
    session.attach(socket)
    generation = reply(session)
    conv = conversation(backend)
    generation.start(conv.start_turn("Hi"))
    await finish(generation)
    assert socket.types() == ["token"]
    assert not session.live  # lost: no further send is tried
    assert session.log.delivered == 0 and session.log.last == 3
    kept = session.log.after(0)
    assert kept is not None and [seq for seq, _ in kept] == [1, 2, 3]
    assert statuses(conv) == ["complete"]  # still attached: it runs on into the log


async def test_a_client_that_stops_reading_is_told_through_its_socket() -> None:
    backend = FakeBackend()
    backend.script.append(Scripted(["a", "b"]))
    session, socket = FakeSession(), FakeSocket()
    socket.hold["token"] = asyncio.Event()  # never set: the client reads nothing
    session.attach(socket)
    generation = reply(session, send_timeout_s=0.05)
    generation.start(conversation(backend).start_turn("Hi"))
    await finish(generation)
    assert socket.not_read == 1
    assert socket.frames == [] and not session.live
    generation.close()


async def test_the_send_deadline_counts_only_time_spent_sending() -> None:
    """The engine pausing between tokens for longer than LLM_SEND_TIMEOUT_S is not the
    client failing to read: only a send in progress is timed."""
    backend, gate, session, socket = paused_after_the_first_chunk("a", "b")
    generation = reply(session, send_timeout_s=0.05)
    generation.start(conversation(backend).start_turn("Hi"))

    async def first_token() -> bool:
        return socket.types() == ["token"]

    await poll(first_token)
    await asyncio.sleep(0.3)  # the engine thinks; the deadline would have passed six times
    gate.set()
    await finish(generation)
    assert socket.not_read == 0
    assert socket.types() == ["token", "token", "response_complete"]
    generation.close()


@pytest.mark.parametrize("failure", [UpstreamError("cut"), UpstreamUnauthorized("no key")])
async def test_an_engine_failure_ends_the_turn_with_an_error_frame(failure: ServiceError) -> None:
    """A recoverable failure ends the turn only; one no later turn can get past (the engine
    refuses the service's key) also ends the connection, after its error frame."""
    backend = FakeBackend()
    backend.script.append(Scripted(["a"], error=failure))
    session, socket = FakeSession(), FakeSocket()
    session.attach(socket)
    telemetry = Telemetry()
    generation = reply(session, telemetry)
    turn = conversation(backend).start_turn("Hi")
    with capture_logs() as logs:
        generation.start(turn)
        await finish(generation)
    assert socket.types() == ["token", "error"]
    failed = {"code": failure.code, "error": failure.message, "cause": None}
    assert logs == [{"event": "turn_failed", "log_level": "warning", **failed}]
    assert socket.frames[1] == {
        "type": "error",
        "error": protocol.error_body(failure),
        "response_id": turn.response_id,
        "seq": 1,
    }
    assert socket.failures == ([] if failure.recoverable else [failure])
    text = generate_latest(telemetry.registry).decode()
    assert metric(text, "llm_service_errors_total", f'code="{failure.code}"') == 1
    assert session.replies_ended == 1


async def test_a_bug_ends_the_turn_with_an_internal_error_not_the_session() -> None:
    backend = FakeBackend()
    backend.script.append(Scripted(["a", "b"]))
    session, socket = FakeSession(), FakeSocket()
    socket.crash_on = "token"
    session.attach(socket)
    generation = reply(session)
    turn = conversation(backend).start_turn("Hi")
    with capture_logs() as logs:
        generation.start(turn)
        await finish(generation)
    assert socket.types() == ["error"]
    assert socket.frames == [
        {
            "type": "error",
            "error": {
                "code": "internal_error",
                "message": "internal error: RuntimeError",
                "severity": "critical",
                "recoverable": True,
            },
            "response_id": turn.response_id,
            "seq": 1,
        }
    ]
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["turn_crashed"]
    assert socket.failures == [] and session.replies_ended == 1
    assert backend.closed_streams == 1


async def finished_with_its_last_frame_held() -> tuple[FakeSocket, Generation]:
    """A reply whose turn has ended, its `response_complete` held until the socket's
    `hold["response_complete"]` is set."""
    backend = FakeBackend()
    backend.script.append(Scripted(["a"]))
    session, socket = FakeSession(), FakeSocket()
    socket.hold["response_complete"] = asyncio.Event()
    session.attach(socket)
    generation = reply(session)
    turn = conversation(backend).start_turn("Hi")
    generation.start(turn)

    async def turn_finished() -> bool:
        return turn.finished_at is not None

    await poll(turn_finished)
    return socket, generation


async def test_settle_waits_for_a_finished_turn_to_send_its_last_frame() -> None:
    socket, generation = await finished_with_its_last_frame_held()
    assert generation.busy  # its response_complete is not sent yet
    asyncio.get_running_loop().call_later(0.05, socket.hold["response_complete"].set)
    await asyncio.wait_for(generation.settle(), 10)
    assert socket.types() == ["token", "response_complete"]
    assert not generation.busy


async def test_settle_does_not_wait_for_a_reply_still_streaming() -> None:
    backend, _, session, socket = paused_after_the_first_chunk("a", "b")
    generation = reply(session)
    generation.start(conversation(backend).start_turn("Hi"))
    await backend.asked.wait()
    await asyncio.wait_for(generation.settle(), 2)  # at once, well inside the unwind limit
    assert generation.busy
    await generation.stop()


async def test_settle_gives_up_on_a_reply_stuck_sending_its_last_frame() -> None:
    """Bounded by the unwind limit (5 s): a client that never takes `response_complete` does
    not hold the next frame forever (the send timeout ends such a connection)."""
    _, generation = await finished_with_its_last_frame_held()  # and never released
    await asyncio.wait_for(generation.settle(), 30)
    assert generation.busy
    await generation.stop()
    assert not generation.busy


async def test_cancel_with_no_reply_streaming_says_none_ran() -> None:
    backend = FakeBackend()
    session, socket = FakeSession(), FakeSocket()
    session.attach(socket)
    telemetry = Telemetry()
    generation = reply(session, telemetry)
    await generation.cancel()  # before any turn
    generation.start(conversation(backend).start_turn("Hi"))
    await finish(generation)
    await generation.cancel()  # after one has ended
    cancelled = [frame for frame in socket.frames if frame["type"] == "cancelled"]
    assert cancelled == [
        {"type": "cancelled", "success": False, "seq": 0},
        {"type": "cancelled", "success": False, "seq": 3},
    ]
    text = generate_latest(telemetry.registry).decode()
    assert metric(text, "llm_service_cancel_latency_seconds_count") == 0


async def test_cancel_stops_the_reply_then_says_what_was_sent() -> None:
    backend, _, session, socket = paused_after_the_first_chunk("a", "b", "c")
    telemetry = Telemetry()
    generation = reply(session, telemetry)
    conv = conversation(backend)
    turn = conv.start_turn("Hi")
    generation.start(turn)

    async def first_token() -> bool:
        return socket.types() == ["token"]

    await poll(first_token)
    with capture_logs() as logs:
        await generation.cancel()
    assert backend.closed_streams == 1 and not generation.busy
    assert socket.types() == ["token", "cancelled"]
    done = socket.frames[-1]
    assert done["success"] is True and done["response_id"] == turn.response_id
    assert done["stats"]["token_frames_after_cancel"] == 0
    assert statuses(conv) == ["interrupted"]
    assert {"event": "turn_cancelled", "sent_tokens": 1, "log_level": "info"} in logs
    text = generate_latest(telemetry.registry).decode()
    assert metric(text, "llm_service_cancel_latency_seconds_count") == 1
    assert 0 <= metric(text, "llm_service_cancel_latency_seconds_sum") < 10


async def test_stop_returns_once_the_engine_request_is_closed() -> None:
    backend, _, session, socket = paused_after_the_first_chunk("a", "b")
    generation = reply(session)
    conv = conversation(backend)
    generation.start(conv.start_turn("Hi"))
    await backend.asked.wait()
    await generation.stop()
    assert backend.closed_streams == 1 and not generation.busy
    assert statuses(conv) == ["interrupted"] and session.replies_ended == 1


async def test_a_failure_logs_what_caused_it() -> None:
    backend = FakeBackend()
    failure = UpstreamError("the engine closed the stream")
    failure.__cause__ = ConnectionResetError("peer reset")
    backend.script.append(Scripted([], error=failure))
    session, socket = FakeSession(), FakeSocket()
    session.attach(socket)
    generation = reply(session)
    with capture_logs() as logs:
        generation.start(conversation(backend).start_turn("Hi"))
        await finish(generation)
    assert [(e["event"], e["cause"]) for e in logs] == [
        ("turn_failed", "ConnectionResetError('peer reset')")
    ]


def failing_with_a_slow_error_frame() -> tuple[FakeBackend, FakeSession, FakeSocket, Generation]:
    """A reply whose engine failed, its error frame still being sent when `stop` comes."""
    backend = FakeBackend()
    backend.script.append(Scripted(["a"], error=UpstreamError("cut")))
    session, socket = FakeSession(), FakeSocket()
    socket.hold["error"] = asyncio.Event()
    session.attach(socket)
    generation = reply(session)
    generation.start(conversation(backend).start_turn("Hi"))
    return backend, session, socket, generation


async def test_stop_lets_a_reply_that_is_unwinding_finish() -> None:
    """The engine failed and the reply is sending its error frame: `stop` (the client went,
    with no grace) waits for that instead of cutting it short."""
    backend, session, socket, generation = failing_with_a_slow_error_frame()

    async def closed() -> bool:
        return backend.closed_streams == 1

    await poll(closed)
    asyncio.get_running_loop().call_later(0.05, socket.hold["error"].set)
    await asyncio.wait_for(generation.stop(), 10)
    assert socket.types() == ["token", "error"]
    assert not generation.busy and session.replies_ended == 1


async def test_stop_cancels_a_reply_stuck_unwinding_after_the_limit() -> None:
    """Bounded by the unwind limit (5 s): an unwinding reply that never ends is cancelled."""
    backend, session, socket, generation = failing_with_a_slow_error_frame()

    async def closed() -> bool:
        return backend.closed_streams == 1

    await poll(closed)
    await asyncio.wait_for(generation.stop(), 30)
    assert socket.types() == ["token"]
    assert not generation.busy and session.replies_ended == 1
