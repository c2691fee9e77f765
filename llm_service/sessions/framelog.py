"""A session's frames in order: their sequence numbers, and the last ones kept for a resume.

Every server frame of a session carries `seq`: 0 on `session_started`, one more for each
frame after it, across reconnects. The log hands out those numbers and keeps the last
`LLM_RESUME_BUFFER_FRAMES` frames as sent, so a client that comes back with the last `seq` it
saw gets exactly the frames after it, with their original numbers; a client that missed
more than that gets told (`after` answers None: a gap). Keeping a frame is one store into a
ring of texts (no object made per frame): the log never grows past its capacity.
"""

from __future__ import annotations

from llm_service.sessions.store import Frame


class FrameLog:
    """The numbering and the recent frames of one session."""

    __slots__ = ("last", "delivered", "_capacity", "_texts", "_base", "_kept")

    def __init__(self, capacity: int, last: int = -1) -> None:
        self.last = last  # the seq of the last frame numbered (-1: none yet)
        self.delivered = last  # the last one written to a socket
        self._capacity = max(1, capacity)
        self._texts: list[str] = []  # frame `seq` is at (seq - _base) % capacity
        self._base = 0
        self._kept = -1  # the seq of the last frame kept

    def next(self) -> int:
        self.last += 1
        return self.last

    def keep(self, seq: int, text: str) -> None:
        texts = self._texts
        if seq != self._kept + 1:  # the numbering jumped (a restored session): start afresh
            texts.clear()
            self._base = seq
        self._kept = seq
        if len(texts) < self._capacity:
            texts.append(text)
        else:
            texts[(seq - self._base) % self._capacity] = text

    def after(self, seq: int) -> list[Frame] | None:
        """The frames after `seq`, in order; None when some of them are no longer kept."""
        if seq >= self.last:
            return []
        texts, base, capacity = self._texts, self._base, self._capacity
        if not texts or self._kept - len(texts) + 1 > seq + 1:
            return None
        return [(s, texts[(s - base) % capacity]) for s in range(seq + 1, self._kept + 1)]

    def undelivered(self) -> int:
        """Frames numbered since the last one a socket took."""
        return self.last - self.delivered
