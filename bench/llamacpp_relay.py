"""What the service costs on top of the embedded engine: raw llama-cpp-python vs /ws/llm.

Runs, alternately and on the same prompt, model and sampling settings (temperature 0):
  raw      llama-cpp-python's create_chat_completion(stream=True) in this process
  service  the same generation asked of `python main.py websocket` (LLM_BACKEND=llamacpp)
           over its WebSocket, timed at the client
and prints medians of time to first token and tokens per second, with the ratio.

    .venv/bin/python bench/llamacpp_relay.py [--rounds 15] [--max-tokens 128]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import websockets

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from processes import start_embedded_service  # noqa: E402

from llm_service.backends.llamacpp import (  # noqa: E402
    extra_buffers_default,
    model_loading,
    packaged_model_path,
)

PROMPT = "Write a short story about a lighthouse keeper and a storm."
SAMPLING = {"temperature": 0.0, "top_p": 0.9, "top_k": 40, "repeat_penalty": 1.1}


@dataclass
class Run:
    ttft_s: float
    total_s: float
    tokens: int
    text: str

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.total_s


def raw_run(llm: object, max_tokens: int, count: object) -> Run:
    started = time.perf_counter()
    first = None
    parts = []
    stream = llm.create_chat_completion(  # type: ignore[attr-defined]
        messages=[{"role": "user", "content": PROMPT}],
        stream=True,
        max_tokens=max_tokens,
        min_p=0.0,
        **SAMPLING,
    )
    for chunk in stream:
        text = chunk["choices"][0]["delta"].get("content")
        if text:
            first = first or time.perf_counter()
            parts.append(text)
    total = time.perf_counter() - started
    reply = "".join(parts)
    return Run((first or started) - started, total, count(reply), reply)  # type: ignore[operator]


async def service_run(url: str, max_tokens: int, count: object) -> Run:
    async with websockets.connect(url, compression=None) as ws:
        await ws.recv()
        await ws.send(
            json.dumps({"type": "start_session", "config": {"max_tokens": max_tokens, **SAMPLING}})
        )
        await ws.recv()
        started = time.perf_counter()
        await ws.send(json.dumps({"type": "user_message", "text": PROMPT}))
        first = None
        parts = []
        while True:
            frame = json.loads(await ws.recv())
            if frame["type"] == "token":
                first = first or time.perf_counter()
                parts.append(frame["data"])
            elif frame["type"] == "response_complete":
                break
            else:
                raise RuntimeError(f"unexpected frame: {frame}")
        total = time.perf_counter() - started
    reply = "".join(parts)
    return Run((first or started) - started, total, count(reply), reply)  # type: ignore[operator]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="llama.cpp threads, the same on both sides",
    )
    args = parser.parse_args()

    from llama_cpp import Llama

    threads = args.threads
    model = packaged_model_path()
    with model_loading(extra_buffers_default()):  # as the service loads it
        llm = Llama(model_path=str(model), n_ctx=8192, n_threads=threads, verbose=False)

    def count(text: str) -> int:
        return len(llm.tokenize(text.encode(), add_bos=False, special=False))

    logs = Path(tempfile.mkdtemp(prefix="fasttalk-bench-"))
    service = start_embedded_service(threads, logs)
    url = service.ws
    raw: list[Run] = []
    relayed: list[Run] = []
    try:
        raw_run(llm, args.max_tokens, count)  # warm-up: both sides load and cache the prompt
        asyncio.run(service_run(url, args.max_tokens, count))
        for _ in range(args.rounds):
            raw.append(raw_run(llm, args.max_tokens, count))
            relayed.append(asyncio.run(service_run(url, args.max_tokens, count)))
    finally:
        service.stop()

    same = all(r.text == s.text for r, s in zip(raw, relayed, strict=True))

    def med(runs: list[Run], attr: str) -> float:
        return float(statistics.median(getattr(r, attr) for r in runs))

    raw_tps, svc_tps = med(raw, "tokens_per_second"), med(relayed, "tokens_per_second")
    raw_ttft, svc_ttft = med(raw, "ttft_s") * 1000, med(relayed, "ttft_s") * 1000
    print(
        f"model {model.name}, {raw[0].tokens} tokens a reply, {args.rounds} rounds "
        f"alternating, {threads} threads, {platform.processor() or platform.machine()}, "
        f"Python {platform.python_version()}; identical replies: {same}"
    )
    print(f"{'':24}{'raw llama-cpp':>16}{'via /ws/llm':>16}{'ratio / diff':>16}")
    paired = statistics.median(
        s.tokens_per_second / r.tokens_per_second for r, s in zip(raw, relayed, strict=True)
    )
    print(f"{'tokens per second':24}{raw_tps:16.1f}{svc_tps:16.1f}{svc_tps / raw_tps:16.3f}")
    print(f"{'  paired ratio (median)':24}{'':32}{paired:16.3f}")
    print(
        f"{'time to first token ms':24}{raw_ttft:16.1f}{svc_ttft:16.1f}{svc_ttft - raw_ttft:+16.1f}"
    )


if __name__ == "__main__":
    main()
