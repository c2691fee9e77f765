"""What each frame that changes a session writes to a persistent store, seen in the SQLite file
while the service (in the test process) runs: the change, as an attached session (no expiry),
before anything else would have written it."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

from llm_service.sessions.store import SessionRecord
from tests.fakes.ollama import FakeOllama, Reply, ollama_call
from tests.support import CLOCK, make_settings, poll, running_service


class StoredSessions:
    """Reads the service's SQLite file as another process would."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _read(self, session_id: str) -> tuple[SessionRecord, float | None] | None:
        with sqlite3.connect(self.path) as db:
            row = db.execute(
                "SELECT record, expires_at FROM fasttalk_sessions WHERE session_id = ?",
                (session_id,),
            ).fetchone()
        return None if row is None else (SessionRecord.loads(row[0]), row[1])

    async def written(self, session_id: str, check: Any) -> SessionRecord:
        """The record once `check(record)` holds; it must be stored as attached."""
        found: list[SessionRecord] = []

        async def holds() -> bool:
            read = await asyncio.to_thread(self._read, session_id)
            if read is None or not check(read[0]):
                return False
            record, expires_at = read
            assert expires_at is None, "an attached session does not expire"
            found.append(record)
            return True

        await poll(holds, limit=5)
        return found[0]


def contents(record: SessionRecord) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in record.messages]


async def test_each_change_is_written_at_once_as_an_attached_session(
    tmp_path: Path, fake_ollama: FakeOllama
) -> None:
    first, second = asyncio.Event(), asyncio.Event()
    fake_ollama.script(
        Reply(["It is", " noon", "."], gate=first, gate_at=1),
        Reply(["Checking."], tool_calls=[ollama_call("get_time", {"city": "Lisbon"})]),
        Reply(["Noon", " there."], gate=second, gate_at=1),
    )
    path = tmp_path / "sessions.db"
    settings = make_settings(ollama_base_url=fake_ollama.url, llm_session_store=f"sqlite:///{path}")
    stored = StoredSessions(path)
    async with running_service(settings) as service:
        client = await service.connect()
        session_id = await client.start()

        await client.send({"type": "start_session", "config": {"system_prompt": "Be brief."}})
        assert (await client.recv())["type"] == "session_configured"
        await stored.written(session_id, lambda r: r.config.get("system_prompt") == "Be brief.")

        # a turn is written as it starts, while its reply streams
        await client.send({"type": "user_message", "text": "Time?", "response_id": "r1"})
        assert (await client.recv())["data"] == "It is"
        record = await stored.written(session_id, lambda r: r.generating)
        assert contents(record) == [("user", "Time?")]
        first.set()
        assert (await client.recv_until("response_complete"))[-1]["response_id"] == "r1"

        await client.send({"type": "truncate", "response_id": "r1", "heard_chars": 5})
        assert (await client.recv())["type"] == "truncated"
        record = await stored.written(session_id, lambda r: r.messages[-1]["content"] == "It is")
        assert record.messages[-1]["status"] == "interrupted"

        await client.send({"type": "start_session", "config": {"tools": [CLOCK]}})
        assert (await client.recv())["type"] == "session_configured"
        await client.send({"type": "user_message", "text": "And in Lisbon?"})
        frames = await client.recv_until("response_complete")
        [call] = next(f for f in frames if f["type"] == "tool_call")["calls"]
        await stored.written(session_id, lambda r: not r.generating and r.turns == 2)

        # a tool result is written as the reply it starts streams
        await client.send({"type": "tool_result", "results": [{"id": call["id"], "content": "12"}]})
        assert (await client.recv())["data"] == "Noon"
        record = await stored.written(session_id, lambda r: r.generating)
        assert contents(record)[-1] == ("tool", "12")
        second.set()
        await client.recv_until("response_complete")
        await client.close()
