"""Settings: the one place the service reads its environment.

Every setting is an environment variable (or a line of `.env`) whose name is the field name in
upper case, the seed's names kept exactly (`LLM_MODEL`, `OLLAMA_BASE_URL`, `LLM_PORT`, ...).
`load_settings()` validates them once at start-up and turns pydantic's report into one message
per bad variable, named as the operator wrote it. `.env.example` lists them all.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from llm_service.errors import ConfigError
from llm_service.redact import MASK, mask_url
from llm_service.sampling import SamplingParams
from llm_service.tracing import Exporting

_SAMPLING = SamplingParams.model_fields
# The sampler settings with a DEFAULT_* variable: DEFAULT_TEMPERATURE, DEFAULT_TOP_P, ...
_SAMPLED = ("temperature", "max_tokens", "top_p", "top_k", "repeat_penalty")
_DEFAULTED = tuple(f"default_{name}" for name in _SAMPLED)
_KEEP_ALIVE = re.compile(r"^-?\d+(\.\d+)?(ns|us|µs|ms|s|m|h)?$|^(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+$")


class Settings(BaseSettings):
    """The service's configuration, read from the environment and `.env`."""

    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", frozen=True
    )

    # Engine
    llm_backend: Literal["auto", "ollama", "llamacpp", "openai"] = "auto"
    llm_model: str = Field("llama3.2:1b", min_length=1)
    ollama_base_url: str = "http://localhost:11434"  # several, comma-separated: a pool
    ollama_keep_alive: str = "5m"
    ollama_api_key: SecretStr | None = None
    openai_base_url: str = "http://localhost:8000/v1"  # several, comma-separated: a pool
    openai_api_key: SecretStr | None = None
    openai_sampling_dialect: Literal["vllm", "llamacpp", "openai"] = "vllm"
    llm_upstream_max_inflight: int = Field(0, ge=0)
    llm_upstream_probe_interval_s: float = Field(10.0, gt=0)
    compute_device: Literal["cuda", "cpu", "mps"] | None = None
    gpu_device_id: int = Field(0, ge=0)
    num_threads: int | None = Field(None, ge=1)
    num_workers: int = Field(1, ge=1, le=16)
    llamacpp_model_path: Path | None = None
    llamacpp_queue_size: int = Field(16, ge=0)
    llamacpp_cache_bytes: int = Field(256 * 2**20, ge=0)  # sessions' prompt state; 0: off
    llamacpp_extra_buffers: Literal["auto", "on", "off"] = "auto"  # auto: off on AMX CPUs

    # Upstream timeouts, in seconds
    llm_connect_timeout_s: float = Field(5.0, gt=0)
    llm_first_token_timeout_s: float = Field(120.0, gt=0)
    llm_chunk_timeout_s: float = Field(30.0, gt=0)

    # Resilience
    circuit_breaker_failure_threshold: int = Field(5, ge=1)
    circuit_breaker_recovery_timeout: float = Field(15.0, gt=0)
    llm_retry_attempts: int = Field(3, ge=1, le=10)
    llm_retry_backoff_s: float = Field(0.25, ge=0)
    llm_retry_max_backoff_s: float = Field(2.0, ge=0)
    llm_retry_deadline_s: float = Field(10.0, gt=0)
    llm_send_timeout_s: float = Field(30.0, gt=0)
    llm_shutdown_grace_s: float = Field(20.0, ge=0)

    # Server
    # unset: loopback, unless a key guards the port (then every interface); see _host_by_key
    llm_host: str = "127.0.0.1"
    llm_port: int = Field(8000, ge=0, le=65535)
    llm_monitoring_port: int = Field(9092, ge=0, le=65535)
    llm_max_connections: int = Field(50, ge=1)
    llm_max_message_bytes: int = Field(256 * 1024, ge=1024)
    llm_ws_compression: bool = False
    health_cache_ttl_s: float = Field(2.0, ge=0)
    llm_request_head_timeout_s: float = Field(10.0, gt=0)
    llm_max_pending_connections: int = Field(128, ge=1)
    forwarded_allow_ips: str = ""
    llm_api_docs: bool = False

    # Sessions that outlive a socket
    llm_session_store: str = "memory"
    llm_session_ttl_s: float = Field(900.0, gt=0)
    llm_resume_grace_s: float = Field(0.0, ge=0)
    llm_resume_buffer_frames: int = Field(4096, ge=16)

    # Access control and abuse limits (0 turns a limit off)
    llm_api_key: SecretStr | None = None
    llm_allowed_origins: str = ""
    llm_max_user_message_chars: int = Field(100_000, ge=0)
    llm_rate_limit_turns_per_minute: int = Field(0, ge=0)
    llm_max_history_turns: int = Field(0, ge=0)
    llm_session_idle_timeout_s: float = Field(1800.0, ge=0)
    llm_max_connections_per_client: int = Field(0, ge=0)
    llm_auth_failures_per_minute: int = Field(10, ge=0)

    # Generation defaults for a new session; their ranges are SamplingParams', as a session's
    default_system_prompt: str = ""
    default_temperature: float | None = None  # unset: the engine's (sampling_defaults)
    default_max_tokens: int = _SAMPLING["max_tokens"].default
    default_context_window: int = Field(8192, ge=256)
    default_top_p: float = _SAMPLING["top_p"].default
    default_top_k: int = _SAMPLING["top_k"].default
    default_repeat_penalty: float = _SAMPLING["repeat_penalty"].default

    # Tracing: OpenTelemetry's own variables; off unless an OTLP endpoint is set (tracing.py)
    otel_exporter_otlp_endpoint: str | None = None  # the collector; traces go to .../v1/traces
    otel_exporter_otlp_traces_endpoint: str | None = None  # the traces URL itself
    otel_exporter_otlp_protocol: Literal["http/protobuf"] = "http/protobuf"
    otel_exporter_otlp_traces_protocol: Literal["http/protobuf"] | None = None
    otel_traces_exporter: Literal["otlp", "console", "none"] = "otlp"
    otel_sdk_disabled: bool = False

    # Logging
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["auto", "json", "console"] = "auto"

    @model_validator(mode="before")
    @classmethod
    def _host_by_key(cls, data: Any) -> Any:
        """An open service listens on loopback only; one with LLM_API_KEY on every interface.
        An explicit LLM_HOST always wins."""
        if isinstance(data, dict) and not str(data.get("llm_host") or "").strip():
            key = data.get("llm_api_key")
            secret = key.get_secret_value() if isinstance(key, SecretStr) else str(key or "")
            data = {**data, "llm_host": "0.0.0.0" if secret.strip() else "127.0.0.1"}
        return data

    @field_validator(
        "compute_device",
        "num_threads",
        "ollama_api_key",
        "llm_api_key",
        "openai_api_key",
        "llamacpp_model_path",
        "default_temperature",
        "otel_exporter_otlp_endpoint",
        "otel_exporter_otlp_traces_endpoint",
        "otel_exporter_otlp_traces_protocol",
        mode="before",
    )
    @classmethod
    def _blank_is_unset(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator(*_DEFAULTED, mode="after")
    @classmethod
    def _sampling_range(cls, value: float | None, info: ValidationInfo) -> float | None:
        if value is None:
            return value
        name = str(info.field_name).removeprefix("default_")
        try:
            SamplingParams.model_validate({name: value})
        except ValidationError as exc:
            raise ValueError(exc.errors()[0]["msg"]) from exc
        return value

    @field_validator("otel_exporter_otlp_endpoint", "otel_exporter_otlp_traces_endpoint")
    @classmethod
    def _collector_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                f"{mask_url(value)!r}: must be an http:// or https:// URL (OTLP over HTTP)"
            )
        return value.strip()

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("ollama_base_url", "openai_base_url")
    @classmethod
    def _http_urls(cls, value: str) -> str:
        urls = [url.strip().rstrip("/") for url in value.split(",") if url.strip()]
        if not urls:
            raise ValueError("must name at least one http:// or https:// URL")
        for url in urls:
            try:
                parts = urlsplit(url)
                parts.port  # noqa: B018 (raises for a port that is not a number)
            except ValueError as exc:
                raise ValueError(f"{mask_url(url)!r} is not a URL ({exc})") from exc
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"{mask_url(url)!r}: must be an http:// or https:// URL")
        if len({mask_url(url) for url in urls}) != len(urls):
            raise ValueError("names the same URL twice (credentials aside)")
        return ",".join(urls)

    @field_validator("llm_session_store")
    @classmethod
    def _store_url(cls, value: str) -> str:
        value = value.strip()
        if value == "memory":
            return value
        parts = urlsplit(value)
        if parts.scheme == "sqlite" and parts.path not in ("", "/") and not parts.netloc:
            return value
        if parts.scheme in ("redis", "rediss", "unix") and (parts.hostname or parts.path):
            return value
        raise ValueError("must be memory, sqlite:///path/to/sessions.db or redis://host:6379/0")

    @field_validator("ollama_keep_alive")
    @classmethod
    def _duration(cls, value: str) -> str:
        if not _KEEP_ALIVE.match(value.strip()):
            raise ValueError("must be a duration such as 5m, 1h30m, 300 (seconds), -1 or 0")
        return value.strip()

    @model_validator(mode="after")
    def _reply_fits_window(self) -> Settings:
        if self.default_max_tokens >= self.default_context_window:
            raise ValueError(
                f"DEFAULT_MAX_TOKENS ({self.default_max_tokens}) must be smaller than "
                f"DEFAULT_CONTEXT_WINDOW ({self.default_context_window}): the prompt needs room"
            )
        return self

    def default_sampling(self, engine: Mapping[str, Any] | None = None) -> SamplingParams:
        """A new session's sampling settings: the DEFAULT_* variables, and for those left
        unset the engine's own defaults (`engine`), else SamplingParams'."""
        values = {name: getattr(self, f"default_{name}") for name in _SAMPLED}
        for name, value in (engine or {}).items():
            if values.get(name) is None:
                values[name] = value
        return SamplingParams(**{k: v for k, v in values.items() if v is not None})

    def tracing(self) -> Exporting | None:
        """Where the service's spans go, or None: tracing off."""
        if self.otel_sdk_disabled or self.otel_traces_exporter == "none":
            return None
        if self.otel_traces_exporter == "console":
            return Exporting(None, console=True)
        if self.otel_exporter_otlp_traces_endpoint:
            return Exporting(self.otel_exporter_otlp_traces_endpoint)
        if self.otel_exporter_otlp_endpoint:
            return Exporting(self.otel_exporter_otlp_endpoint.rstrip("/") + "/v1/traces")
        return None

    def ollama_urls(self) -> tuple[str, ...]:
        """OLLAMA_BASE_URL's URLs: one engine, or the pool of several."""
        return tuple(self.ollama_base_url.split(","))

    def openai_urls(self) -> tuple[str, ...]:
        """OPENAI_BASE_URL's URLs: one engine, or the pool of several."""
        return tuple(self.openai_base_url.split(","))

    def sqlite_path(self) -> Path | None:
        """LLM_SESSION_STORE's file when it is SQLite. As in SQLAlchemy's URLs, the part after
        `sqlite:///` is the path: `sqlite:///sessions.db` is relative to the working
        directory, `sqlite:////var/lib/fasttalk/sessions.db` absolute."""
        parts = urlsplit(self.llm_session_store)
        return Path(parts.path[1:]) if parts.scheme == "sqlite" else None

    def api_keys(self) -> tuple[str, ...]:
        """The accepted API keys (LLM_API_KEY, comma-separated); empty when access is open."""
        if self.llm_api_key is None:
            return ()
        return tuple(k.strip() for k in self.llm_api_key.get_secret_value().split(",") if k.strip())

    def allowed_origins(self) -> frozenset[str]:
        """The Origins allowed to open a WebSocket (LLM_ALLOWED_ORIGINS); empty: any."""
        return frozenset(
            o.strip().rstrip("/") for o in self.llm_allowed_origins.split(",") if o.strip()
        )

    def shown(self) -> dict[str, str]:
        """Every setting as `NAME -> value` for display, secrets and URL passwords masked."""
        shown: dict[str, str] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, SecretStr):
                text = MASK
            elif name.endswith("_url") or name == "llm_session_store":
                text = ",".join(mask_url(url) for url in value.split(","))
            else:
                text = "" if value is None else str(value)
            shown[name.upper()] = text
        return shown


def load_settings(**overrides: Any) -> Settings:
    """Read the environment (and `.env`), apply `overrides`, and validate.

    Raises `ConfigError` with one line per offending variable, named in upper case.
    """
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        secret = {n.upper() for n, f in Settings.model_fields.items() if "SecretStr" in str(f)}
        lines = []
        for err in exc.errors():
            where = ".".join(str(part) for part in err["loc"]).upper()
            given = err.get("input")
            hide = where in ("", *secret) or isinstance(given, dict)
            if isinstance(given, str) and "://" in given:
                given = ",".join(mask_url(url) for url in given.split(","))
            shown = "" if hide else f" (got {given!r})"
            message = err["msg"].removeprefix("Value error, ")
            lines.append(f"{where or 'settings'}: {message}{shown}")
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines)) from exc
