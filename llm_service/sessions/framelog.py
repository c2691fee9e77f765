"""A session's frames in order: their sequence numbers, and the last ones kept for a resume.

Every server frame of a session carries `seq`: 0 on `session_started`, one more for each
frame after it, across reconnects. The log hands out those numbers and keeps the last
`LLM_RESUME_BUFFER_FRAMES` frames as sent, so a client that comes back with the last `seq` it
saw gets exactly the frames after it, with their original numbers; a client that missed
more than that gets told (`after` answers None: a gap). Keeping a frame is one append to a
bounded deque: the log never grows past its capacity.
"""

from __future__ import annotations

from collections import deque

from llm_service.sessions.store import Frame


class FrameLog:
    """The numbering and the recent frames of one session."""

    def __init__(self, capacity: int, last: int = -1) -> None:
        self.last = last  # the seq of the last frame numbered (-1: none yet)
        self.delivered = last  # the last one written to a socket
        self._frames: deque[Frame] = deque(maxlen=max(1, capacity))

    def next(self) -> int:
        self.last += 1
        return self.last

    def keep(self, seq: int, text: str) -> None:
        self._frames.append((seq, text))

    def after(self, seq: int) -> list[Frame] | None:
        """The frames after `seq`, in order; None when some of them are no longer kept."""
        if seq >= self.last:
            return []
        frames = self._frames
        if not frames or frames[0][0] > seq + 1:
            return None
        return [frame for frame in frames if frame[0] > seq]

    def undelivered(self) -> int:
        """Frames numbered since the last one a socket took."""
        return self.last - self.delivered
