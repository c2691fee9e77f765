"""The service's error tree and its stable codes.

Every failure a client can see is a `ServiceError`. Each class carries the `code` that goes on
the wire (stable, lower snake_case, listed in the README), a `severity`, whether the same socket
can be used again (`recoverable`) and, for an error that ends the connection, the WebSocket
`close_code` that follows its frame (as starlette's `WebSocketException` carries its code).
Lower layers raise them, translated once from whatever caused them (`raise
UpstreamUnavailable(...) from exc`); `ws.py` alone turns them into frames. A failure to start
is a `StartupError`: one message naming the variable or the port, and exit status 2.

    ServiceError
    ├── ClientError                      the client sent something the service will not take
    │   ├── InvalidJSON                  invalid_json
    │   ├── InvalidMessage               invalid_message
    │   ├── InvalidConfig                invalid_config
    │   ├── MessageTooLarge              message_too_large
    │   ├── MessageTooLong               message_too_long
    │   ├── RateLimited                  rate_limited (with retry_after_ms)
    │   ├── GenerationInProgress         generation_in_progress
    │   ├── ContextOverflow              context_overflow
    │   ├── SessionNotFound              session_not_found (wrong token, unknown, expired, ended)
    │   ├── ResumeGap                    resume_gap (frames after last_seq are no longer held)
    │   ├── MaxConnections               max_connections (closes the socket with 1013)
    │   ├── MaxConnectionsPerClient      max_connections_per_client (closes with 1013)
    │   ├── Unauthorized                 unauthorized (HTTP 401 at the handshake)
    │   └── SessionIdleTimeout           session_idle_timeout (closes the socket with 1000)
    ├── ServiceShuttingDown              service_shutting_down (closes the socket with 1001)
    ├── EngineError                      the engine failed or could not be reached
    │   ├── UpstreamUnavailable          upstream_unavailable
    │   │   └── EngineBusy               upstream_unavailable (load shed: not the engine's fault)
    │   ├── UpstreamError                upstream_error
    │   │   └── UpstreamRejected         upstream_error (the engine refused the request: 400)
    │   ├── UpstreamUnauthorized         upstream_unauthorized (the engine refused the
    │   │                                 service's key; closes the socket with 1011)
    │   ├── ModelNotFound                model_not_found
    │   ├── CircuitOpen                  circuit_open
    │   └── UpstreamTimeout              timeout
    └── InternalError                    internal_error

    StartupError                         the service cannot start (exit status 2)
    ├── ConfigError                      a setting the service cannot start with
    ├── ModelFileError                   no usable GGUF model file
    ├── DeviceUnavailableError           COMPUTE_DEVICE names a device this host lacks
    └── StartupFailed                    a port is taken, or the app failed to start
"""

from __future__ import annotations

from typing import ClassVar, Literal

Severity = Literal["low", "medium", "high", "critical"]


class ServiceError(Exception):
    """A failure with a stable wire code."""

    code: ClassVar[str] = "internal_error"
    severity: ClassVar[Severity] = "high"
    recoverable: ClassVar[bool] = True
    close_code: ClassVar[int | None] = None  # the close that follows the frame, if any
    http_status: ClassVar[int] = 400  # when the refusal is an HTTP answer instead

    def __init__(self, message: str, *, retry_after_ms: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_ms = retry_after_ms
        self.response_id: str | None = None  # the reply it ended or refused, once known


class ClientError(ServiceError):
    """The client sent something the service will not take; nothing changed."""

    severity: ClassVar[Severity] = "low"


class InvalidJSON(ClientError):
    code = "invalid_json"


class InvalidMessage(ClientError):
    code = "invalid_message"


class InvalidConfig(ClientError):
    code = "invalid_config"


class MessageTooLarge(ClientError):
    code = "message_too_large"


class MessageTooLong(ClientError):
    code = "message_too_long"


class RateLimited(ClientError):
    code = "rate_limited"
    http_status = 429


class GenerationInProgress(ClientError):
    code = "generation_in_progress"


class ContextOverflow(ClientError):
    code = "context_overflow"


class SessionNotFound(ClientError):
    """One answer for a wrong token and for a session that is unknown, expired or ended, so
    that nobody can probe which sessions exist."""

    code = "session_not_found"


class ResumeGap(ClientError):
    code = "resume_gap"


class MaxConnections(ClientError):
    code = "max_connections"
    severity = "medium"
    recoverable = False
    close_code = 1013  # try again later


class MaxConnectionsPerClient(ClientError):
    code = "max_connections_per_client"
    severity = "medium"
    recoverable = False
    close_code = 1013


class Unauthorized(ClientError):
    code = "unauthorized"
    severity = "medium"
    recoverable = False
    http_status = 401


class SessionIdleTimeout(ClientError):
    code = "session_idle_timeout"
    recoverable = False
    close_code = 1000


class ServiceShuttingDown(ServiceError):
    code = "service_shutting_down"
    severity: ClassVar[Severity] = "medium"
    recoverable = False
    close_code = 1001  # going away


class EngineError(ServiceError):
    """The engine failed or could not be reached; the turn did not complete.

    `engine_fault` says whether the failure speaks against the engine's health (and so counts
    towards opening the circuit breaker) or only against this one request.
    """

    severity: ClassVar[Severity] = "high"
    engine_fault: ClassVar[bool] = True


class UpstreamUnavailable(EngineError):
    code = "upstream_unavailable"


class EngineBusy(UpstreamUnavailable):
    """The engine is healthy but full: shedding load is not a failure, so the breaker does
    not count it."""

    engine_fault = False


class UpstreamError(EngineError):
    code = "upstream_error"


class UpstreamRejected(UpstreamError):
    engine_fault = False


class MalformedToolCall(UpstreamError):
    """The model called a tool in a shape that cannot be used (arguments that are not a JSON
    object, no name): the model's doing, not the engine failing."""

    engine_fault = False


class UpstreamUnauthorized(EngineError):
    """The engine refused the service's own credentials: a configuration error that no retry
    and no other turn can get past until an operator fixes it."""

    code = "upstream_unauthorized"
    severity = "critical"
    recoverable = False
    close_code = 1011  # internal error: the server cannot serve this connection
    engine_fault = False


class ModelNotFound(EngineError):
    code = "model_not_found"
    severity = "critical"
    engine_fault = False


class CircuitOpen(EngineError):
    code = "circuit_open"
    severity = "medium"
    engine_fault = False


class UpstreamTimeout(EngineError):
    code = "timeout"


class InternalError(ServiceError):
    code = "internal_error"
    severity = "critical"


class StartupError(Exception):
    """The service cannot start. The message alone is shown, so it names what to change."""


class ConfigError(StartupError, ValueError):
    """The environment holds a setting the service cannot start with."""


class ModelFileError(StartupError):
    """No usable GGUF model file."""


class DeviceUnavailableError(StartupError):
    """COMPUTE_DEVICE asks for a device this host does not have."""


class StartupFailed(StartupError):
    """The main app did not start: a port was taken, or its lifespan failed."""
