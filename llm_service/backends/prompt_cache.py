"""Each session's prompt, kept for the embedded engine across other sessions' turns.

llama.cpp keeps the KV cache of the last prompt it read, so one session alone re-reads only
its new message; but each turn of another session replaces it, and every session then reads
its whole history again (seconds on a CPU for a long one). `PromptCache` keeps, per session,
the tokens of its last prompt and reply and llama.cpp's sequence state for them (the KV
cache), least recently used first, within `LLAMACPP_CACHE_BYTES`: a session that finds its
state here has it restored (a copy, milliseconds) instead of reading its prompt again, and
one evicted pays a single re-read, never an error. It is shared by the engine's workers,
which the same model's state fits, so it is guarded by a lock.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SavedPrompt:
    """The tokens llama.cpp had read for a session, and its state (KV cache) for them."""

    tokens: tuple[int, ...]
    state: bytes


class PromptCache:
    """Saved prompts by session, least recently used first, at most `capacity_bytes`."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self._saved: OrderedDict[str, SavedPrompt] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._saved)

    def get(self, session: str) -> SavedPrompt | None:
        with self._lock:
            saved = self._saved.get(session)
            if saved is not None:
                self._saved.move_to_end(session)
            return saved

    def put(self, session: str, saved: SavedPrompt) -> None:
        """Keep `saved` for `session` (replacing its last), evicting the least recently used
        sessions while over the bound; a state larger than the whole bound is not kept."""
        with self._lock:
            old = self._saved.pop(session, None)
            if old is not None:
                self.bytes -= len(old.state)
            if len(saved.state) > self.capacity_bytes:
                return
            self._saved[session] = saved
            self.bytes += len(saved.state)
            while self.bytes > self.capacity_bytes:
                _, evicted = self._saved.popitem(last=False)
                self.bytes -= len(evicted.state)
                self.evictions += 1


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many tokens `a` and `b` share from the start."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
