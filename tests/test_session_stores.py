"""Session stores as an operator runs them: SQLite across a restart, Redis shared by replicas.

Every test runs `python main.py websocket` as real processes against the fake Ollama, and the
Redis ones against a real `redis-server` on a free loopback port (Debian's package, which CI
installs: a machine without it fails these tests rather than skipping them). They check what
`PROTOCOL.md` promises of sessions that outlive a socket and a process: a conversation that
goes on after a restart, one start-up line for a file that is not a session store, a reply
resumed mid-stream on another replica with nothing missing and nothing twice, the old socket
closed when a session moves, a Redis outage that costs nothing but durability, `end_session`
deleting at once, and a resume token that reaches neither Redis nor the logs. Then what a
client of a reply followed from another replica may also expect: its missed frames counted
as the replay, the first replica's grace and frame buffer not cutting it, `get_history` and
`cancel` while it streams, a move back to the first replica, a session with no turn yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import hashlib
import os
import random
import signal
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis.asyncio as aioredis
import websockets
from websockets.exceptions import ConnectionClosed

from tests.fakes.ollama import FakeOllama, Reply
from tests.process import ServiceProcess, free_port, main_command, service_env, service_process
from tests.redis_server import RedisServer
from tests.support import Client, poll, tokens_of

pytestmark = pytest.mark.slow

SESSION_KEY = "fasttalk:session:{}"
FRAMES_KEY = "fasttalk:frames:{}:*"  # a stream per holder of the session
LONG_REPLY = [f" w{i}" for i in range(60)]  # 60 tokens, 0.05 s apart: 3 s of streaming
TURN_ENDS = ("response_complete", "cancelled", "error")
FOLLOWED_REPLY = [f" f{i}" for i in range(40)]  # 2 s


@pytest.fixture
async def fake() -> AsyncIterator[FakeOllama]:
    async with FakeOllama() as fake_ollama:
        yield fake_ollama


def settings(fake: FakeOllama, store: str, **extra: str) -> dict[str, str]:
    return {
        "LLM_BACKEND": "ollama",
        "OLLAMA_BASE_URL": fake.url,
        "LLM_SESSION_STORE": store,
        "HEALTH_CACHE_TTL_S": "0",
        **extra,
    }


@contextlib.asynccontextmanager
async def replicas(
    tmp_path: Path, count: int, **env: str
) -> AsyncIterator[tuple[ServiceProcess, ...]]:
    """`count` service processes with the same settings, each in a directory of its own."""
    async with contextlib.AsyncExitStack() as stack:
        started = []
        for index in range(count):
            workdir = tmp_path / f"replica{index}"
            workdir.mkdir()
            started.append(await stack.enter_async_context(service_process(workdir, **env)))
        yield tuple(started)


async def connect(service: ServiceProcess) -> Client:
    ws = await websockets.connect(service.ws_url, compression=None, open_timeout=5)
    return Client(ws)


async def health(service: ServiceProcess) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=5) as http:
        body: dict[str, Any] = (await http.get(f"http://127.0.0.1:{service.port}/health")).json()
    return body


def pairs(messages: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in messages]


async def tokens_then_drop(client: Client, count: int) -> list[str]:
    """Read `count` token frames of the reply in flight, then reset the socket (no close)."""
    seen: list[str] = []
    while len(seen) < count:
        frame = await client.recv()
        assert frame["type"] == "token", frame
        seen.append(frame["data"])
    client.ws.transport.abort()
    return seen


async def rest_of_turn(client: Client, limit: float) -> list[dict[str, Any]]:
    """The frames up to the end of the turn in flight, or what came within `limit` s."""
    frames: list[dict[str, Any]] = []
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(limit):
            while not frames or frames[-1]["type"] not in TURN_ENDS:
                frames.append(await client.recv(limit))
    return frames


async def closed_with(client: Client) -> ConnectionClosed:
    """Read until the server closes the socket; the close, as the client saw it."""
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            await client.recv(limit=10)
    return closed.value


# -- SQLite ---------------------------------------------------------------------------------


async def test_sqlite_conversation_survives_a_restart(tmp_path: Path, fake: FakeOllama) -> None:
    db = tmp_path / "sessions.db"
    env = settings(fake, f"sqlite:///{db}")  # sqlite:////abs/path
    fake.script(Reply(["Paris", " is", " the capital."]), Reply(["Berlin", "."]))
    async with service_process(tmp_path, **env) as first:
        client = await connect(first)
        session_id = await client.start()
        token = client.resume_token
        assert token is not None
        await client.send(
            {
                "type": "start_session",
                "config": {"system_prompt": "Answer in one line.", "temperature": 0.3},
            }
        )
        assert (await client.recv())["type"] == "session_configured"
        assert tokens_of(await client.turn("Capital of France?")) == [
            "Paris",
            " is",
            " the capital.",
        ]
        assert tokens_of(await client.turn("And Germany?")) == ["Berlin", "."]
        first.signal(signal.SIGTERM)
        # an attached socket is told the service is stopping; that frame is numbered too
        closed = await closed_with(client)
        assert closed.rcvd is not None and closed.rcvd.code == 1001
        assert await first.wait(15) == 0
    last_seq = client.last_seq
    assert token not in db.read_bytes().decode(errors="replace")

    fake.script(Reply(["Rome", "."]))
    async with service_process(tmp_path, **env) as second:
        client = await connect(second)
        await client.start()
        answer = await client.resume(session_id, token, last_seq)
        assert answer == {
            "type": "session_resumed",
            "session_id": session_id,
            "seq": last_seq,
            "replayed": 0,
            "generating": False,
        }
        # Client.recv checks that the numbering goes on from last_seq: history is last_seq + 1
        assert await client.history() == [
            {"role": "system", "content": "Answer in one line."},
            {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris is the capital.", "status": "complete"},
            {"role": "user", "content": "And Germany?"},
            {"role": "assistant", "content": "Berlin.", "status": "complete"},
        ]
        assert client.seqs == [last_seq, last_seq + 1]
        frames = await client.turn("And Italy?")
        assert frames[-1]["type"] == "response_complete" and tokens_of(frames) == ["Rome", "."]
        assert client.seqs[0] == last_seq and client.seqs[-1] == last_seq + 1 + len(frames)
        request = fake.chats[-1]
        assert pairs(request.messages) == [
            ("system", "Answer in one line."),
            ("user", "Capital of France?"),
            ("assistant", "Paris is the capital."),
            ("user", "And Germany?"),
            ("assistant", "Berlin."),
            ("user", "And Italy?"),
        ]
        assert request.options["temperature"] == 0.3
        await client.close()


async def test_a_tool_call_pending_over_a_restart_is_answered_after_resume(
    tmp_path: Path, fake: FakeOllama
) -> None:
    """The session's tools and its unanswered call are stored: after a restart the client
    resumes, sends the result, and the follow-up reply has the whole exchange."""
    env = settings(fake, f"sqlite:///{tmp_path / 'sessions.db'}")
    clock = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
    call = {"id": "t1", "function": {"name": "get_time", "arguments": {"city": "Oslo"}}}
    fake.script(Reply(["Checking."], tool_calls=[call]), Reply(["It is noon."]))
    async with service_process(tmp_path, **env) as first:
        client = await connect(first)
        session_id = await client.start()
        token = client.resume_token
        assert token is not None
        await client.send({"type": "start_session", "config": {"tools": [clock]}})
        assert (await client.recv())["type"] == "session_configured"
        frames = await client.turn("Time in Oslo?")
        assert [f["type"] for f in frames] == ["token", "tool_call", "response_complete"]
        first.signal(signal.SIGTERM)
        await closed_with(client)
        assert await first.wait(15) == 0
    async with service_process(tmp_path, **env) as second:
        client = await connect(second)
        await client.start()
        assert (await client.resume(session_id, token, client.last_seq))[
            "type"
        ] == "session_resumed"
        await client.send({"type": "tool_result", "results": [{"id": "t1", "content": "12:00"}]})
        frames = await client.recv_until("response_complete")
        assert tokens_of(frames) == ["It is noon."]
        request = fake.chats[-1]
        assert request.body["tools"] == [
            {"type": "function", "function": {"name": "get_time", "description": "",
                                              "parameters": {"type": "object"}}}
        ]  # fmt: skip
        assert request.messages[-2:] == [
            {"role": "assistant", "content": "Checking.", "tool_calls": [call]},
            {"role": "tool", "content": "12:00", "tool_name": "get_time"},
        ]
        await client.close()


async def start_until_exit(tmp_path: Path, **env: str) -> tuple[int, str]:
    """Run `main.py websocket` with `env` until it exits (it should, at once)."""
    full = service_env(tmp_path, free_port(), free_port(), **env)
    proc = await asyncio.create_subprocess_exec(
        *main_command("websocket"),
        cwd=tmp_path,
        env=full,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


def random_bytes(path: Path) -> None:
    path.write_bytes(os.urandom(8192))


def foreign_database(path: Path) -> None:
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")
        db.execute("INSERT INTO invoices (total) VALUES (12.5)")
        db.commit()


@pytest.mark.parametrize("make", [random_bytes, foreign_database], ids=["corrupt", "foreign"])
async def test_a_file_that_is_not_a_session_store_stops_start_up(
    tmp_path: Path, fake: FakeOllama, make: Callable[[Path], None]
) -> None:
    path = tmp_path / "other.db"
    make(path)
    before = path.read_bytes()
    code, out = await start_until_exit(tmp_path, **settings(fake, f"sqlite:///{path}"))
    assert code == 2, out
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "LLM_SESSION_STORE" in errors[0], out
    assert "Traceback" not in out and "service_ready" not in out, out
    assert path.read_bytes() == before  # nothing of it was overwritten


# -- every store: a reply dropped and resumed, frame for frame ---------------------------


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """LLM_SESSION_STORE for each kind of store (Redis: a server of the test's own)."""
    if request.param != "redis":
        yield "memory" if request.param == "memory" else f"sqlite:///{tmp_path / 'sessions.db'}"
        return
    workdir = tmp_path / "redis"
    workdir.mkdir()
    server = RedisServer(workdir)
    await server.start()
    try:
        yield server.url
    finally:
        await server.kill()


async def test_a_reply_dropped_at_random_points_is_replayed_frame_for_frame(
    tmp_path: Path, fake: FakeOllama, store_url: str
) -> None:
    """Three resets at random frames of one reply, each resumed on a new socket: what the
    client saw, joined, is the very frame list of the same reply streamed with no drop (the
    same seqs, types and text; the stats' counts, not their timings)."""
    url = store_url
    words = [f" r{i}" for i in range(30)]
    drops = sorted(random.Random(f"drops-{url[:5]}").sample(range(1, len(words) + 1), 3))
    fake.script(Reply(words, delay=0.02), Reply(words))  # the second: the undropped reference
    async with service_process(tmp_path, **settings(fake, url, LLM_RESUME_GRACE_S="10")) as svc:
        client = await connect(svc)
        session_id = await client.start()
        token = client.resume_token
        assert token is not None
        await client.send({"type": "user_message", "text": "Count."})
        seen: list[dict[str, Any]] = []
        for drop in drops:
            while len(seen) < drop:
                seen.append(await client.recv())
            last_seq = client.last_seq
            client.ws.transport.abort()
            client = await connect(svc)
            await client.start()
            answer = await client.resume(session_id, token, last_seq)
            assert answer["type"] == "session_resumed", (drop, answer)
        seen += await rest_of_turn(client, 10)
        await client.close()

        reference = await connect(svc)
        await reference.start()
        undropped = await reference.turn("Count.")
        await reference.close()
    assert [_comparable(f) for f in seen] == [_comparable(f) for f in undropped], drops


def _comparable(frame: dict[str, Any]) -> dict[str, Any]:
    """A frame less what differs between two runs of one reply: its session, its id, its timings."""
    out = {k: v for k, v in frame.items() if k not in ("session_id", "response_id")}
    if "stats" in out:
        out["stats"] = {k: v for k, v in out["stats"].items() if not isinstance(v, float)}
    return out


# -- Redis: a reply resumed on another replica ---------------------------------------------


@dataclass
class Moved:
    """A reply that started on replica A, whose socket was reset mid-reply, and the session
    resumed on replica B."""

    a: ServiceProcess
    b: ServiceProcess
    session_id: str
    token: str
    seen_on_a: list[str]  # the tokens A's client read
    last_seq: int  # the last seq A's client saw
    answer: dict[str, Any]  # what the resume got
    on_b: Client


async def move_mid_reply(
    stack: contextlib.AsyncExitStack,
    tmp_path: Path,
    fake: FakeOllama,
    redis: RedisServer,
    drop_after: int = 2,
    sent_before_resume: int = 0,
    env: dict[str, str] | None = None,
) -> Moved:
    """Two replicas sharing `redis` (a 10 s grace, then `env`); a turn on A, its socket reset
    after `drop_after` tokens; once the fake has sent `sent_before_resume` chunks, a resume on
    B with the last seq A's client saw."""
    extra = {"LLM_RESUME_GRACE_S": "10", **(env or {})}
    a, b = await stack.enter_async_context(
        replicas(tmp_path, 2, **settings(fake, redis.url, **extra))
    )
    on_a = await connect(a)
    session_id = await on_a.start()
    token = on_a.resume_token
    assert token is not None
    await on_a.send({"type": "user_message", "text": "Count."})
    seen_on_a = await tokens_then_drop(on_a, drop_after)
    await poll(_chunks_sent(fake, sent_before_resume))
    on_b = await connect(b)
    await on_b.start()
    answer = await on_b.resume(session_id, token, on_a.last_seq)
    assert answer["type"] == "session_resumed", answer
    return Moved(a, b, session_id, token, seen_on_a, on_a.last_seq, answer, on_b)


def _chunks_sent(fake: FakeOllama, count: int) -> Callable[[], Awaitable[bool]]:
    async def sent() -> bool:
        return not count or (bool(fake.chats) and fake.chats[0].chunks_sent >= count)

    return sent


@pytest.mark.parametrize("drop_after", [1, 10, 40])
async def test_a_reply_resumes_mid_stream_on_another_replica(
    tmp_path: Path, fake: FakeOllama, redis_server: RedisServer, drop_after: int
) -> None:
    fake.script(Reply(LONG_REPLY, delay=0.05), Reply(["Second", " answer."]))
    async with contextlib.AsyncExitStack() as stack:
        # the reply runs on past the drop, so that the client on B has missed frames
        moved = await move_mid_reply(
            stack, tmp_path, fake, redis_server, drop_after, sent_before_resume=drop_after + 5
        )
        answer, on_b = moved.answer, moved.on_b
        assert answer["session_id"] == moved.session_id and answer["generating"] is True
        assert answer["seq"] == moved.last_seq + answer["replayed"]
        rest = await rest_of_turn(on_b, 15)
        assert [f["type"] for f in rest] == ["token"] * (len(rest) - 1) + ["response_complete"]
        assert moved.seen_on_a + tokens_of(rest) == LONG_REPLY  # nothing missing, nothing twice
        assert len(fake.chats) == 1 and fake.chats[0].closed_at is None  # ran once, to its end

        # at once, as a client may: the reply is over, so the next turn is not refused
        frames = await on_b.turn("Again?")
        assert frames[-1]["type"] == "response_complete", frames
        assert tokens_of(frames) == ["Second", " answer."]
        assert pairs(fake.chats[1].messages) == [
            ("user", "Count."),
            ("assistant", "".join(LONG_REPLY)),
            ("user", "Again?"),
        ]
        assert await on_b.history() == [
            {"role": "user", "content": "Count."},
            {"role": "assistant", "content": "".join(LONG_REPLY), "status": "complete"},
            {"role": "user", "content": "Again?"},
            {"role": "assistant", "content": "Second answer.", "status": "complete"},
        ]
        await on_b.close()


async def test_resuming_on_another_replica_closes_the_old_socket(
    tmp_path: Path, fake: FakeOllama, redis_server: RedisServer
) -> None:
    fake.script(Reply(["One", "."]), Reply(["Two", "."]))
    async with replicas(tmp_path, 2, **settings(fake, redis_server.url)) as (a, b):
        on_a = await connect(a)
        session_id = await on_a.start()
        assert on_a.resume_token is not None
        assert tokens_of(await on_a.turn("First?")) == ["One", "."]

        on_b = await connect(b)
        await on_b.start()
        answer = await on_b.resume(session_id, on_a.resume_token, on_a.last_seq)
        assert answer == {
            "type": "session_resumed",
            "session_id": session_id,
            "seq": on_a.last_seq,
            "replayed": 0,
            "generating": False,
        }
        closed = await closed_with(on_a)
        assert closed.rcvd is not None
        assert (closed.rcvd.code, closed.rcvd.reason) == (1000, "resumed")

        assert tokens_of(await on_b.turn("Second?")) == ["Two", "."]
        assert pairs(fake.chats[1].messages) == [
            ("user", "First?"),
            ("assistant", "One."),
            ("user", "Second?"),
        ]
        await on_b.close()


# -- Redis: following a reply from another replica, beyond the plain case --------------------


async def test_frames_missed_before_a_resume_on_another_replica_count_as_replayed(
    tmp_path: Path, fake: FakeOllama, redis_server: RedisServer
) -> None:
    """Frames the client missed that were already sent when it resumed are the replay:
    `session_resumed` counts them (`replayed`) and says where they end (`seq`)."""
    fake.script(Reply(FOLLOWED_REPLY, delay=0.05))
    async with contextlib.AsyncExitStack() as stack:
        # 8 more tokens are sent, and published, before the resume
        moved = await move_mid_reply(stack, tmp_path, fake, redis_server, sent_before_resume=10)
        rest = await rest_of_turn(moved.on_b, 5)
        assert moved.seen_on_a + tokens_of(rest) == FOLLOWED_REPLY  # they did come
        answer = moved.answer
        assert answer["generating"] is True and answer["replayed"] >= 1, answer
        assert answer["seq"] == moved.last_seq + answer["replayed"]
        await moved.on_b.close()


@pytest.mark.parametrize(
    "limits",
    [{"LLM_RESUME_GRACE_S": "1"}, {"LLM_RESUME_BUFFER_FRAMES": "16"}],
    ids=["grace", "frame_buffer"],
)
async def test_a_reply_followed_on_another_replica_outlives_the_first_ones_limits(
    tmp_path: Path, fake: FakeOllama, redis_server: RedisServer, limits: dict[str, str]
) -> None:
    """The grace and the frame buffer bound a reply that streams for nobody. Once its client
    has resumed on another replica it streams for that client, who reads it: neither the grace
    timer nor the frame buffer of the replica generating it may stop it."""
    fake.script(Reply(FOLLOWED_REPLY, delay=0.05))  # 2 s: past a 1 s grace, 38 frames past 16
    async with contextlib.AsyncExitStack() as stack:
        moved = await move_mid_reply(stack, tmp_path, fake, redis_server, env=limits)
        assert moved.answer["generating"] is True
        rest = await rest_of_turn(moved.on_b, 4)
        assert rest and rest[-1]["type"] == "response_complete", (
            f"{len(tokens_of(rest))} tokens, then no end of the turn within 4 s "
            f"(the engine request was closed: {fake.chats[0].closed_at is not None})"
        )
        assert moved.seen_on_a + tokens_of(rest) == FOLLOWED_REPLY
        await moved.on_b.close()


async def test_get_history_during_a_followed_reply_loses_no_token(
    tmp_path: Path, fake: FakeOllama, redis_server: RedisServer
) -> None:
    """A frame the resuming replica sends itself while it follows a reply streaming on
    another (here `history`) takes a number of the session's own: no token may lose its."""
    fake.script(Reply(FOLLOWED_REPLY, delay=0.05))
    async with contextlib.AsyncExitStack() as stack:
        moved = await move_mid_reply(stack, tmp_path, fake, redis_server)
        on_b = moved.on_b
        frames = [await on_b.recv() for _ in range(3)]
        await on_b.send({"type": "get_history"})
        frames += await rest_of_turn(on_b, 5)
        assert [f["type"] for f in frames].count("history") == 1
        assert frames[-1]["type"] == "response_complete"
        assert moved.seen_on_a + tokens_of(frames) == FOLLOWED_REPLY
        await on_b.close()


async def test_cancel_stops_a_reply_followed_from_another_replica(
    tmp_path: Path, fake: FakeOllama, redis_server: RedisServer
) -> None:
    """`cancel` on the socket a reply streams to stops it, wherever it is generated: at most
    one more token, `cancelled` with success, and the engine request closed."""
    fake.script(Reply(FOLLOWED_REPLY, delay=0.05))
    async with contextlib.AsyncExitStack() as stack:
        on_b = (await move_mid_reply(stack, tmp_path, fake, redis_server)).on_b
        assert (await on_b.recv())["type"] == "token"
        await on_b.send({"type": "cancel"})
        frames = await rest_of_turn(on_b, 5)
        assert frames[-1]["type"] == "cancelled" and frames[-1]["success"] is True, frames[-1]
        assert len(tokens_of(frames)) <= 1
        await fake.chats[0].wait_closed(5)
        await on_b.close()


async def test_a_session_moved_back_to_its_first_replica_has_what_happened_elsewhere(
    tmp_path: Path, fake: FakeOllama, redis_server: RedisServer
) -> None:
    """A replica that gave a session up mid-reply keeps no copy of its own: when the client
    comes back to it, the conversation and the numbering are the other replica's."""
    reply = [f" g{i}" for i in range(20)]
    fake.script(Reply(reply, delay=0.02), Reply(["On", " B."]))
    async with contextlib.AsyncExitStack() as stack:
        moved = await move_mid_reply(stack, tmp_path, fake, redis_server)
        on_b = moved.on_b
        assert (await rest_of_turn(on_b, 5))[-1]["type"] == "response_complete"
        assert tokens_of(await on_b.turn("Second?")) == ["On", " B."]
        last_seq = on_b.last_seq
        await on_b.close()

        back = await connect(moved.a)
        await back.start()
        answer = await back.resume(moved.session_id, moved.token, last_seq)
        assert answer == {
            "type": "session_resumed",
            "session_id": moved.session_id,
            "seq": last_seq,
            "replayed": 0,
            "generating": False,
        }
        assert await back.history() == [
            {"role": "user", "content": "Count."},
            {"role": "assistant", "content": "".join(reply), "status": "complete"},
            {"role": "user", "content": "Second?"},
            {"role": "assistant", "content": "On B.", "status": "complete"},
        ]
        await back.close()


async def test_a_reply_moved_twice_mid_stream_reaches_the_third_replica_whole(
    tmp_path: Path, fake: FakeOllama, redis_server: RedisServer
) -> None:
    """A to B while A streams, then B to C while B still follows A: C follows B's frames,
    which are A's renumbered; the turn ends on C with every token once and the history whole."""
    reply = [f" h{i}" for i in range(60)]
    fake.script(Reply(reply, delay=0.05), Reply(["On", " C."]))
    env = settings(fake, redis_server.url, LLM_RESUME_GRACE_S="10")
    async with replicas(tmp_path, 3, **env) as (a, b, c):
        on_a = await connect(a)
        session_id = await on_a.start()
        token = on_a.resume_token
        assert token is not None
        await on_a.send({"type": "user_message", "text": "Count."})
        seen = await tokens_then_drop(on_a, 3)
        on_b = await connect(b)
        await on_b.start()
        answer = await on_b.resume(session_id, token, on_a.last_seq)
        assert answer["type"] == "session_resumed" and answer["generating"] is True, answer
        while len(seen) < 20:
            frame = await on_b.recv()
            assert frame["type"] == "token", frame
            seen.append(frame["data"])
        on_b.ws.transport.abort()

        on_c = await connect(c)
        await on_c.start()
        answer = await on_c.resume(session_id, token, on_b.last_seq)
        assert answer["type"] == "session_resumed" and answer["generating"] is True, answer
        rest = await rest_of_turn(on_c, 15)
        assert [f["type"] for f in rest] == ["token"] * (len(rest) - 1) + ["response_complete"]
        assert seen + tokens_of(rest) == reply  # nothing missing, nothing twice
        assert len(fake.chats) == 1

        assert tokens_of(await on_c.turn("Second?")) == ["On", " C."]
        assert pairs(fake.chats[1].messages) == [
            ("user", "Count."),
            ("assistant", "".join(reply)),
            ("user", "Second?"),
        ]
        await on_c.close()


async def test_a_session_with_no_turn_yet_resumes_on_another_replica(
    tmp_path: Path, fake: FakeOllama, redis_server: RedisServer
) -> None:
    """A session exists from `session_started` on, and a Redis store lets it resume on any
    replica: also before its first turn, while its first socket is still open."""
    async with replicas(tmp_path, 2, **settings(fake, redis_server.url)) as (a, b):
        on_a = await connect(a)
        session_id = await on_a.start()
        assert on_a.resume_token is not None

        on_b = await connect(b)
        await on_b.start()
        answer = await on_b.resume(session_id, on_a.resume_token, on_a.last_seq)
        assert answer["type"] == "session_resumed", answer
        closed = await closed_with(on_a)
        assert closed.rcvd is not None
        assert (closed.rcvd.code, closed.rcvd.reason) == (1000, "resumed")
        await on_b.close()


# -- Redis: outages, end_session, the token ---------------------------------------------------


async def test_redis_going_away_degrades_and_recovers(
    tmp_path: Path, fake: FakeOllama, redis_server: RedisServer
) -> None:
    async with replicas(tmp_path, 1, **settings(fake, redis_server.url)) as (service,):
        client = await connect(service)
        session_id = await client.start()
        assert (await client.turn("Before?"))[-1]["type"] == "response_complete"
        assert (await health(service))["session_store"]["available"] is True

        await redis_server.kill()
        frames = await client.turn("During?")  # served from memory
        assert frames[-1]["type"] == "response_complete" and tokens_of(frames)

        async def degraded() -> bool:
            store = (await health(service))["session_store"]
            return store["available"] is False and store["degraded"] is True

        await poll(degraded, limit=10)

        await redis_server.start()  # same port, empty: it kept nothing

        async def available() -> bool:
            store = (await health(service))["session_store"]
            return store["available"] is True and store["degraded"] is False

        async def user_messages() -> list[str]:
            async with redis_server.client() as r:
                raw = await r.get(SESSION_KEY.format(session_id))
            assert raw is not None, "the session was not written again once Redis answered"
            record = orjson.loads(raw)
            return [m["content"] for m in record["messages"] if m["role"] == "user"]

        # no new turn: the service tries the store again by itself, and writes what it
        # could not write during the outage
        await poll(available, limit=30)
        assert await user_messages() == ["Before?", "During?"]

        assert (await client.turn("After?"))[-1]["type"] == "response_complete"

        async def written() -> bool:
            return await user_messages() == ["Before?", "During?", "After?"]

        await poll(written, limit=30)
        await client.close()


async def test_end_session_deletes_it_from_redis_at_once(
    tmp_path: Path, fake: FakeOllama, redis_server: RedisServer
) -> None:
    async with replicas(tmp_path, 2, **settings(fake, redis_server.url)) as (a, b):
        on_a = await connect(a)
        session_id = await on_a.start()
        token = on_a.resume_token
        assert token is not None
        assert (await on_a.turn("Hello?"))[-1]["type"] == "response_complete"
        async with redis_server.client() as r:
            await poll(lambda: _exists(r, SESSION_KEY.format(session_id)))

            await on_a.send({"type": "end_session"})
            assert (await on_a.recv())["type"] == "session_ended"
            assert await r.exists(SESSION_KEY.format(session_id)) == 0  # at once: no wait
            assert [key async for key in r.scan_iter(FRAMES_KEY.format(session_id))] == []
        closed = await closed_with(on_a)
        assert closed.rcvd is not None and closed.rcvd.code == 1000

        for replica in (b, a):
            client = await connect(replica)
            await client.start()
            answer = await client.resume(session_id, token, on_a.last_seq)
            assert answer["type"] == "error", answer
            assert answer["error"]["code"] == "session_not_found"
            assert answer["error"]["recoverable"] is True
            # the connection keeps its fresh session
            assert (await client.turn("Still here?"))[-1]["type"] == "response_complete"
            await client.close()


async def _exists(r: aioredis.Redis, key: str) -> bool:
    return bool(await r.exists(key))


async def test_the_resume_token_reaches_neither_redis_nor_the_logs(
    tmp_path: Path, fake: FakeOllama, redis_server: RedisServer
) -> None:
    env = settings(fake, redis_server.url, LLM_RESUME_GRACE_S="10", LOG_LEVEL="DEBUG")
    fake.script(Reply([f" t{i}" for i in range(20)], delay=0.03))
    async with redis_server.client() as watcher:
        pubsub = watcher.pubsub()
        await pubsub.psubscribe("*")
        async with replicas(tmp_path, 2, **env) as (a, b):
            on_a = await connect(a)
            session_id = await on_a.start()
            token = on_a.resume_token
            assert token is not None
            await on_a.send({"type": "start_session", "config": {"system_prompt": "Be brief."}})
            assert (await on_a.recv())["type"] == "session_configured"
            await on_a.send({"type": "user_message", "text": "Count."})
            await tokens_then_drop(on_a, 5)

            on_b = await connect(b)
            await on_b.start()
            assert (await on_b.resume(session_id, token, on_a.last_seq))["type"] == (
                "session_resumed"
            )
            assert (await on_b.recv_until("response_complete", limit=10))[-1]["stats"]
            await on_b.close()

            stored = await _everything_in(watcher)
            logs = "".join(a.output + b.output)
        published = await _published(pubsub)
        await pubsub.aclose()  # type: ignore[no-untyped-call]

    record = orjson.loads(stored[SESSION_KEY.format(session_id)][0])
    assert record["token_hash"] == hashlib.sha256(token.encode()).hexdigest()
    streams = [key for key in stored if fnmatch.fnmatchcase(key, FRAMES_KEY.format(session_id))]
    frames = [value for key in streams for value in stored[key] if '"seq":' in value]
    assert sum(value.count('"seq":') for value in frames) > 20  # the reply's frames were there
    for key, values in stored.items():
        assert all(token not in value for value in values), f"the resume token is in {key}"
    assert published and all(token not in message for message in published)
    assert session_id in logs and token not in logs


async def _everything_in(r: aioredis.Redis) -> dict[str, list[str]]:
    """Every key's values as text: a string's value, each stream entry's id and fields, and
    the members of any other kind of key."""
    found: dict[str, list[str]] = {}
    async for raw_key in r.scan_iter("*"):
        key = _texts(raw_key)[0]
        found[key] = _texts(await _read(r, key))
    return found


async def _read(r: aioredis.Redis, key: str) -> Any:
    kind = _texts(await r.type(key))[0]
    if kind == "string":
        return await r.get(key)
    if kind == "stream":
        return await r.xrange(key)
    if kind == "hash":
        return await r.hgetall(key)
    if kind == "list":
        return await r.lrange(key, 0, -1)
    if kind == "set":
        return await r.smembers(key)
    assert kind == "zset", f"{key} is a {kind}"
    return await r.zrange(key, 0, -1)


def _texts(value: object) -> list[str]:
    """The strings in a Redis reply, however nested."""
    if isinstance(value, bytes):
        return [value.decode(errors="replace")]
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [text for pair in value.items() for item in pair for text in _texts(item)]
    if isinstance(value, list | tuple | set):
        return [text for item in value for text in _texts(item)]
    return [] if value is None else [str(value)]


async def _published(pubsub: Any) -> list[str]:
    """The pub/sub messages seen so far, on every channel."""
    messages: list[str] = []
    while True:
        message = await pubsub.get_message(timeout=0.2)  # None: nothing more came
        if message is None:
            return messages
        if message["type"] == "pmessage":
            messages.append(message["data"].decode(errors="replace"))
