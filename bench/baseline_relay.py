"""The baseline of the benchmarks: the least a WebSocket gateway in front of Ollama can do.

`python bench/baseline_relay.py --port P --upstream URL` serves `/ws/llm` with the service's
frames and nothing else: `session_started` on connect; on `user_message`, `/api/chat` streamed
from the upstream with httpx and one `token` frame per NDJSON content line, then
`response_complete`; on `cancel`, the upstream response closed and `cancelled`. No history,
no circuit breaker, no retries, no metrics, no logging. It runs on the service's stack
(uvicorn with uvloop, httptools and the same WebSocket implementation, orjson, httpx), so a
comparison with it isolates the service's own work. It reads each upstream response to its
end, which keeps the connection for the next turn, as plain httpx code does.
"""

from __future__ import annotations

import argparse
import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import orjson
import uvicorn
from fastapi import FastAPI, WebSocket

MODEL = "llama3.2:1b"


def create_app(upstream: str) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # httpx's default keep-alive pool (20): sequential turns reuse a connection, and the
        # pool never holds hundreds of idle ones, which httpcore scans on every request.
        limits = httpx.Limits(max_connections=10_000, max_keepalive_connections=20)
        async with httpx.AsyncClient(
            base_url=upstream, timeout=httpx.Timeout(30.0), limits=limits
        ) as client:
            app.state.client = client
            yield

    app = FastAPI(lifespan=lifespan)

    async def relay(ws: WebSocket, client: httpx.AsyncClient, text: str) -> None:
        body = {"model": MODEL, "messages": [{"role": "user", "content": text}], "stream": True}
        stats: dict[str, Any] = {}
        async with client.stream("POST", "/api/chat", content=orjson.dumps(body)) as response:
            async for line in response.aiter_lines():
                if not line:
                    continue
                data = orjson.loads(line)
                if data.get("done"):
                    # The last line. Reading on to the end of the body (the closing chunk)
                    # gives the connection back to the pool instead of closing it.
                    stats = {"tokens_generated": data.get("eval_count")}
                    continue
                token = {"type": "token", "data": data["message"]["content"]}
                await ws.send_text(orjson.dumps(token).decode())
        await ws.send_text(orjson.dumps({"type": "response_complete", "stats": stats}).decode())

    @app.websocket("/ws/llm")
    async def socket(ws: WebSocket) -> None:
        client: httpx.AsyncClient = ws.app.state.client
        await ws.accept()
        session = {"type": "session_started", "session_id": str(uuid.uuid4())}
        await ws.send_text(orjson.dumps(session).decode())
        task: asyncio.Task[None] | None = None
        try:
            while True:
                message = await ws.receive()
                if message["type"] == "websocket.disconnect":
                    return
                frame = orjson.loads(message["text"])
                if frame["type"] == "user_message":
                    if task is not None:  # it may still be closing its upstream response
                        await asyncio.wait({task})
                    task = asyncio.create_task(relay(ws, client, frame["text"]))
                elif frame["type"] == "cancel" and task is not None:
                    task.cancel()
                    await asyncio.wait({task})
                    await ws.send_text('{"type":"cancelled","success":true}')
        finally:
            if task is not None:
                task.cancel()
                await asyncio.wait({task})

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description="The bare WebSocket relay of the benchmarks.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--upstream", default="http://127.0.0.1:11434")
    args = parser.parse_args()
    uvicorn.run(
        create_app(args.upstream),
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        ws_per_message_deflate=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
