"""The server-sent events decoder of the OpenAI-compatible backend, on every split of its input."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llm_service.backends.openai import sse_data


async def decoded(chunks: list[bytes]) -> list[bytes]:
    async def source() -> AsyncIterator[bytes]:
        for chunk in chunks:
            yield chunk

    return [data async for data in sse_data(source())]


STREAM = (
    b": keep-alive\n\n"
    b'data: {"a": 1}\n\n'
    b"event: message\nid: 7\nretry: 100\n"
    b'data: {"b":\ndata: 2}\n\n'
    b"data:no-space\n\n"
    b"id: 8\n\n"  # no data: no event
    b"data: [DONE]\n\n"
    b"data: cut off at the end"
)
EXPECTED = [b'{"a": 1}', b'{"b":\n2}', b"no-space", b"[DONE]"]


@pytest.mark.parametrize("ending", [b"\n", b"\r\n", b"\r"])
async def test_every_line_ending_gives_the_same_events(ending: bytes) -> None:
    assert await decoded([STREAM.replace(b"\n", ending)]) == EXPECTED


@given(
    st.lists(st.integers(0, len(STREAM) * 2), max_size=12), st.sampled_from([b"\n", b"\r\n", b"\r"])
)
async def test_any_split_into_chunks_gives_the_same_events(cuts: list[int], ending: bytes) -> None:
    stream = STREAM.replace(b"\n", ending)
    points = sorted({min(c, len(stream)) for c in cuts})
    chunks = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    assert await decoded(chunks) == EXPECTED
