"""Who may talk to the service, and how much: API keys, allowed origins, per-client limits.

`Access` holds the keys of `LLM_API_KEY` and the origins of `LLM_ALLOWED_ORIGINS`. A client
presents a key as `Authorization: Bearer <key>`, as a `token` query parameter, or (browsers
cannot set headers on a WebSocket) as a `Sec-WebSocket-Protocol` entry `bearer.<key>`; keys
are compared in constant time. `TurnRateLimiter` counts one connection's turns in a sliding
minute. `redact_query_secrets` keeps a `?token=` key out of uvicorn's request log lines.
"""

from __future__ import annotations

import hmac
import logging
import re
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

BEARER_PROTOCOL_PREFIX = "bearer."
_QUERY_SECRET = re.compile(r"((?:[?&])(?:token|api_key|key)=)[^&\s\"']*", re.IGNORECASE)


@dataclass(frozen=True)
class Presented:
    """The key a request carried, and where it was found."""

    key: str | None
    via: str


class Access:
    """The API keys and origins the service accepts."""

    def __init__(self, keys: Iterable[str], origins: Iterable[str]) -> None:
        self._keys = tuple(k.encode() for k in keys)
        self._origins = frozenset(origins)

    @property
    def open(self) -> bool:
        """True when no key is required."""
        return not self._keys

    def key_ok(self, presented: str | None) -> bool:
        """Whether `presented` is one of the keys; every key is compared, in constant time."""
        if not self._keys:
            return True
        candidate = (presented or "").encode()
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(candidate, key)
        return matched and presented is not None

    def origin_ok(self, origin: str | None) -> bool:
        """Browsers always send Origin; a client that sends none is not a browser page."""
        return not self._origins or origin is None or origin.rstrip("/") in self._origins


def presented_key(
    headers: Mapping[str, str], query: Mapping[str, str], subprotocols: Iterable[str]
) -> Presented:
    """The key a request carries: Authorization header, `token` query, or subprotocol."""
    authorization = headers.get("authorization", "")
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return Presented(value.strip(), "header")
    if query.get("token"):
        return Presented(query["token"], "query")
    for protocol in subprotocols:
        if protocol.startswith(BEARER_PROTOCOL_PREFIX):
            return Presented(protocol[len(BEARER_PROTOCOL_PREFIX) :], "subprotocol")
    return Presented(None, "none")


def chosen_subprotocol(subprotocols: list[str]) -> str | None:
    """The subprotocol to accept: a client that offers some must get one of them back, and
    the first that is not a key is preferred (`["fasttalk", "bearer.<key>"]` -> fasttalk)."""
    for protocol in subprotocols:
        if not protocol.startswith(BEARER_PROTOCOL_PREFIX):
            return protocol
    return subprotocols[0] if subprotocols else None


class TurnRateLimiter:
    """At most `per_minute` turns in any sliding 60 seconds (0: no limit)."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._limit = per_minute
        self._clock = clock
        self._starts: deque[float] = deque()

    def admit(self) -> float:
        """Record a turn and return 0, or return the seconds to wait before one is allowed."""
        if self._limit <= 0:
            return 0.0
        now = self._clock()
        while self._starts and now - self._starts[0] >= 60.0:
            self._starts.popleft()
        if len(self._starts) >= self._limit:
            return 60.0 - (now - self._starts[0])
        self._starts.append(now)
        return 0.0


def redact_query_secrets(text: str) -> str:
    return _QUERY_SECRET.sub(r"\1[redacted]", text)


class RedactQuerySecrets(logging.Filter):
    """A logging filter that masks `token=` (and `key=`) query values in a record's text."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact_query_secrets(message)
        if redacted != message:
            record.msg, record.args = redacted, ()
        return True


def protect_server_logs() -> None:
    """Install the redaction on uvicorn's loggers, which log each upgrade's path and query."""
    for name in ("uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactQuerySecrets) for f in logger.filters):
            logger.addFilter(RedactQuerySecrets())
