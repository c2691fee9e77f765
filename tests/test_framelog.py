"""The frame log against the plainest model of it: every frame kept, the last `capacity` held."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from llm_service.sessions.framelog import FrameLog


@given(
    capacity=st.integers(min_value=1, max_value=12),
    start=st.integers(min_value=-1, max_value=50),
    frames=st.integers(min_value=0, max_value=60),
    asked=st.integers(min_value=-2, max_value=130),
)
def test_after_is_the_frames_after_a_seq_or_a_gap(
    capacity: int, start: int, frames: int, asked: int
) -> None:
    log = FrameLog(capacity)
    log.last = log.delivered = start  # as a restored session's numbering goes on
    sent: list[tuple[int, str]] = []
    for _ in range(frames):
        seq = log.next()
        text = f'{{"type":"token","seq":{seq}}}'
        log.keep(seq, text)
        sent.append((seq, text))
    held = sent[-capacity:]
    want = [frame for frame in sent if frame[0] > asked]
    got = log.after(asked)
    if asked >= log.last:
        assert got == []
    elif held and held[0][0] <= asked + 1:
        assert got == want
    else:
        assert got is None  # some frames after `asked` are gone (or were never kept here)


def test_a_jump_in_numbering_starts_the_log_afresh() -> None:
    log = FrameLog(4)
    for _ in range(3):
        seq = log.next()
        log.keep(seq, f"a{seq}")
    log.keep(10, "b10")  # replayed from another replica after a gap
    log.last = 10
    assert log.after(9) == [(10, "b10")]
    assert log.after(2) is None
    assert log.undelivered() == 10 - log.delivered
