"""The service's error tree and its stable codes.

Every failure a client can see is one of these classes. Each carries the `code` that goes on the
wire (stable, lower snake_case, listed in the README), a `severity` and whether the same socket
can be used again (`recoverable`). Lower layers raise them, translated once from whatever
caused them (`raise UpstreamUnavailable(...) from exc`); `ws.py` alone turns them into frames.

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
    │   ├── MaxConnections               max_connections (closes the socket with 1013)
    │   ├── MaxConnectionsPerClient      max_connections_per_client (closes with 1013)
    │   ├── Unauthorized                 unauthorized (closes the socket with 1008)
    │   └── SessionIdleTimeout           session_idle_timeout (closes the socket with 1000)
    ├── ServiceShuttingDown              service_shutting_down (closes the socket with 1001)
    ├── EngineError                      the engine failed or could not be reached
    │   ├── UpstreamUnavailable          upstream_unavailable
    │   │   └── EngineBusy               upstream_unavailable (load shed: not the engine's fault)
    │   ├── UpstreamError                upstream_error
    │   │   └── UpstreamRejected         upstream_error (the engine refused the request: 400)
    │   ├── ModelNotFound                model_not_found
    │   ├── CircuitOpen                  circuit_open
    │   └── UpstreamTimeout              timeout
    └── InternalError                    internal_error
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

Severity = Literal["low", "medium", "high", "critical"]


class ServiceError(Exception):
    """A failure with a stable wire code."""

    code: ClassVar[str] = "internal_error"
    severity: ClassVar[Severity] = "high"
    recoverable: ClassVar[bool] = True

    def __init__(self, message: str, *, retry_after_ms: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_ms = retry_after_ms

    def to_wire(self) -> dict[str, Any]:
        """The `error` object of an error frame."""
        body: dict[str, Any] = {
            "code": self.code,
            "message": self.message,
            "severity": self.severity,
            "recoverable": self.recoverable,
        }
        if self.retry_after_ms is not None:
            body["retry_after_ms"] = self.retry_after_ms
        return body


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


class GenerationInProgress(ClientError):
    code = "generation_in_progress"


class ContextOverflow(ClientError):
    code = "context_overflow"


class MaxConnections(ClientError):
    code = "max_connections"
    severity = "medium"
    recoverable = False


class MaxConnectionsPerClient(ClientError):
    code = "max_connections_per_client"
    severity = "medium"
    recoverable = False


class Unauthorized(ClientError):
    code = "unauthorized"
    severity = "medium"
    recoverable = False


class SessionIdleTimeout(ClientError):
    code = "session_idle_timeout"
    recoverable = False


class ServiceShuttingDown(ServiceError):
    code = "service_shutting_down"
    severity: ClassVar[Severity] = "medium"
    recoverable = False


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
