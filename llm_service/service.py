"""`Service`: the built parts of one running service, as uvicorn's `ServerState` is a server's.

The app's lifespan makes each part once (`app.py`) and puts them here; routes read them. It
holds no policy and does no work of its own.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from llm_service.backends import BackendChoice
from llm_service.backends.pool import EnginePool
from llm_service.config import Settings
from llm_service.conversation import SessionConfig, TurnLimits
from llm_service.health import EngineHealth
from llm_service.metrics import Telemetry
from llm_service.security import Access
from llm_service.tracing import OFF, Tracing


@dataclass(frozen=True)
class Service:
    """Everything a request handler needs, built once per app."""

    settings: Settings
    backend: EnginePool  # the engines (one, or several), each behind its breaker
    choice: BackendChoice  # which engines, why, and on which device
    telemetry: Telemetry
    health: EngineHealth
    access: Access
    default_config: SessionConfig  # a new session's, from the DEFAULT_* settings
    turn_limits: TurnLimits
    context_window: int  # DEFAULT_CONTEXT_WINDOW, capped by what the engine holds
    tracing: Tracing = OFF  # the turns' spans (OTEL_EXPORTER_OTLP_ENDPOINT)
    started_at: float = field(default_factory=time.monotonic)
