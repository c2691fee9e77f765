"""Logging set-up: structlog over the standard library, configured once by the CLI.

Events are snake_case names with key-value fields; `session_id` is bound per connection through
context variables. Output is JSON lines when stderr is not a terminal (containers, files) and a
readable console format on a terminal; uvicorn's own loggers go through the same handler.
Every line is redacted on its way out (`redact.redact_text`: URL credentials, `token=`-like
query parameters), at every level. Credentials and prompt text never reach the log: the
WebSocket protocol, which at DEBUG would log handshake headers (the `Authorization` key, the
`bearer.<key>` subprotocol) and every frame, is held at INFO whatever `LOG_LEVEL` says.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Literal

import orjson
import structlog

from llm_service.redact import redact_text


def _dumps(obj: Any, default: Any = None) -> str:
    return orjson.dumps(obj, default=default or str).decode()


def configure_logging(
    level: str = "INFO", fmt: Literal["auto", "json", "console"] = "auto"
) -> None:
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer(serializer=_dumps)
        if use_json
        else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.processors.format_exc_info if use_json else _identity,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        _RedactingFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers = []
        logger.propagate = True
    logging.getLogger("uvicorn.error").addFilter(_OncePerServerPair())
    # One access line per /health probe drowns everything else; show them only when debugging.
    logging.getLogger("uvicorn.access").setLevel("DEBUG" if level == "DEBUG" else "WARNING")
    logging.getLogger("httpx").setLevel("DEBUG" if level == "DEBUG" else "WARNING")
    # The WebSocket protocol logs through uvicorn.error; at DEBUG it would write each
    # handshake's headers (keys) and every frame (prompts, replies).
    for name in ("websockets", "uvicorn.error"):
        logging.getLogger(name).setLevel("INFO" if level == "DEBUG" else level)


class _OncePerServerPair(logging.Filter):
    """uvicorn says "Started server process", "Shutting down" and "Finished server process"
    once per server; the service runs two in one process, so the second of each pair (the
    same line again, at once) is dropped."""

    _LIFECYCLE = frozenset(
        {"Started server process [%d]", "Finished server process [%d]", "Shutting down"}
    )

    def __init__(self) -> None:
        super().__init__()
        self._last: tuple[object, object] | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg not in self._LIFECYCLE:
            return True
        seen = (record.msg, record.args)
        repeated = seen == self._last
        self._last = seen
        return not repeated


class _RedactingFormatter(structlog.stdlib.ProcessorFormatter):
    """structlog's formatter, with every finished line passed through `redact_text`."""

    def format(self, record: logging.LogRecord) -> str:
        return redact_text(super().format(record))


def _identity(_: Any, __: str, event: Any) -> Any:
    return event
