"""Who may talk to the service, and how much: API keys, allowed origins, per-client limits.

`Access` holds the keys of `LLM_API_KEY` and the origins of `LLM_ALLOWED_ORIGINS`, and its
`authenticate()` is the one check for HTTP and WebSocket requests alike. A client presents a
key as `Authorization: Bearer <key>`, as a `token` query parameter, or (browsers cannot set
headers on a WebSocket) as a `Sec-WebSocket-Protocol` entry `bearer.<key>`; keys are compared
in constant time. Failed attempts are counted per client address (`AuthThrottle`): past
`LLM_AUTH_FAILURES_PER_MINUTE` that address is refused at once for the rest of the minute,
and failures are logged once per address per minute (30 lines a minute at most), however
many there are.
"""

from __future__ import annotations

import hmac
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import structlog

from llm_service.errors import ClientError, RateLimited, Unauthorized
from llm_service.timing import SlidingWindow

log = structlog.get_logger("llm_service.security")

BEARER_PROTOCOL_PREFIX = "bearer."
_WINDOW_S = 60.0
_TRACKED_ADDRESSES = 4096
_LOGGED_FAILURES_PER_MINUTE = 30


@dataclass(frozen=True)
class Presented:
    """The key a request carried, and where it was found."""

    key: str | None
    via: str


class AuthThrottle:
    """Failed key attempts per client address in a sliding minute; bounded in addresses."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._limit = per_minute
        self._clock = clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def retry_after(self, client: str) -> float:
        """Seconds until `client` may try a key again (0: it may now)."""
        failures = self._recent(client)
        if not self._limit or failures is None or len(failures) < self._limit:
            return 0.0
        return max(0.001, _WINDOW_S - (self._clock() - failures[0]))

    def failed(self, client: str) -> bool:
        """Count a failure; True when it is the first of this address's current minute."""
        failures = self._recent(client)
        if failures is None:
            failures = self._failures[client] = deque()
            while len(self._failures) > _TRACKED_ADDRESSES:
                self._failures.popitem(last=False)
        first = not failures
        failures.append(self._clock())
        while len(failures) > max(self._limit, 1):
            failures.popleft()
        return first

    def _recent(self, client: str) -> deque[float] | None:
        failures = self._failures.get(client)
        if failures is None:
            return None
        self._failures.move_to_end(client)
        now = self._clock()
        while failures and now - failures[0] >= _WINDOW_S:
            failures.popleft()
        return failures


class Access:
    """The API keys and origins the service accepts, and the throttle on failed keys."""

    def __init__(
        self, keys: Iterable[str], origins: Iterable[str], throttle: AuthThrottle | None = None
    ) -> None:
        self._keys = tuple(k.encode() for k in keys)
        self._origins = frozenset(origins)
        self._throttle = throttle or AuthThrottle(0)
        self._log_budget = SlidingWindow(_LOGGED_FAILURES_PER_MINUTE)  # across addresses

    @property
    def open(self) -> bool:
        """True when no key is required."""
        return not self._keys

    def authenticate(
        self,
        client: str,
        endpoint: str,
        headers: Mapping[str, str],
        query: Mapping[str, str],
        subprotocols: Iterable[str] = (),
    ) -> ClientError | None:
        """None when the request may go on; else why it is refused (`unauthorized`, or
        `rate_limited` for an address that failed too often: its key is not even read)."""
        if self.open:
            return None
        wait = self._throttle.retry_after(client)
        if wait:
            return RateLimited(
                "too many failed API key attempts from this address; "
                f"retry in {wait:.0f} s (LLM_AUTH_FAILURES_PER_MINUTE)",
                retry_after_ms=max(1, round(wait * 1000)),
            )
        presented = presented_key(headers, query, subprotocols)
        if self.key_ok(presented.key):
            return None
        if self._throttle.failed(client) and self._log_budget.admit() == 0:
            log.warning(
                "auth_failed",
                endpoint=endpoint,
                client=client,
                via=presented.via,
                reason="missing key" if presented.key is None else "wrong key",
                detail="further failures from this address this minute are counted, not logged",
            )
        return Unauthorized(
            "a valid API key is required (Authorization: Bearer, the token query parameter, "
            "or a bearer.<key> subprotocol)"
        )

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
    """The subprotocol to accept: the first that is not a key (`["fasttalk", "bearer.<key>"]`
    -> fasttalk). A key-bearing entry is never selected, since the answer would echo the key;
    a client that offers nothing else gets no subprotocol (browsers then refuse the socket,
    which is why the page offers `fasttalk` beside its key)."""
    for protocol in subprotocols:
        if not protocol.startswith(BEARER_PROTOCOL_PREFIX):
            return protocol
    return None
