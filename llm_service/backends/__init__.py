"""Inference engines behind the `LLMBackend` Protocol, and the choice between them."""

from __future__ import annotations

from llm_service.backends.base import LLMBackend
from llm_service.backends.ollama import OllamaBackend
from llm_service.config import Settings


def make_backend(settings: Settings) -> LLMBackend:
    """The backend `LLM_BACKEND` names, configured from `settings`."""
    api_key = settings.ollama_api_key.get_secret_value() if settings.ollama_api_key else None
    return OllamaBackend(
        settings.ollama_base_url,
        settings.llm_model,
        keep_alive=settings.ollama_keep_alive,
        api_key=api_key,
        connect_timeout=settings.llm_connect_timeout_s,
        first_chunk_timeout=settings.llm_first_token_timeout_s,
        chunk_timeout=settings.llm_chunk_timeout_s,
        max_connections=settings.llm_max_connections + 4,
    )
