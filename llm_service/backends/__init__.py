"""Inference engines behind the `LLMBackend` Protocol, and the choice between them.

`LLM_BACKEND=ollama`, `openai` or `llamacpp` forces one engine kind; `auto` (the default)
uses Ollama when `OLLAMA_BASE_URL` answers at start-up and the embedded llama.cpp engine
otherwise. Several comma-separated URLs in `OLLAMA_BASE_URL` or `OPENAI_BASE_URL` make
several engines, which the app puts in one pool (`pool.py`). The choice, and why, is logged
and shown on `/health`. The compute device is applied here too: for the embedded engine it
is probed on this host (asking for a GPU that is not there is a start-up error); for Ollama,
which usually runs elsewhere, `COMPUTE_DEVICE` is passed on as Ollama's options only when
set, and otherwise Ollama decides.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from typing import Any

import structlog

from llm_service.backends.base import LLMBackend
from llm_service.backends.http import Timeouts
from llm_service.backends.ollama import OllamaBackend
from llm_service.backends.openai import OpenAIBackend
from llm_service.config import Settings
from llm_service.device import Device, detect_device, llamacpp_gpu_layers, ollama_options
from llm_service.redact import mask_url

log = structlog.get_logger("llm_service.backends")


@dataclass(frozen=True)
class BackendChoice:
    """The engines the service runs on (one, or a pool), why, and on which device."""

    engines: tuple[LLMBackend, ...]
    reason: str
    device: Device | None

    def describe_device(self) -> dict[str, Any] | None:
        if self.device is None:
            return None
        return {"kind": self.device.kind, "name": self.device.name, "source": self.device.source}


def make_ollama(settings: Settings, device: Device | None = None) -> tuple[OllamaBackend, ...]:
    """One Ollama backend per URL of OLLAMA_BASE_URL."""
    api_key = settings.ollama_api_key.get_secret_value() if settings.ollama_api_key else None
    extra = ollama_options(device, settings.num_threads) if device is not None else None
    return tuple(
        OllamaBackend(
            url,
            settings.llm_model,
            keep_alive=settings.ollama_keep_alive,
            api_key=api_key,
            timeouts=timeouts(settings),
            max_connections=settings.llm_max_connections + 4,
            extra_options=extra,
        )
        for url in settings.ollama_urls()
    )


def make_openai(settings: Settings) -> tuple[OpenAIBackend, ...]:
    """One OpenAI-compatible backend per URL of OPENAI_BASE_URL."""
    api_key = settings.openai_api_key.get_secret_value() if settings.openai_api_key else None
    return tuple(
        OpenAIBackend(
            url,
            settings.llm_model,
            api_key=api_key,
            dialect=settings.openai_sampling_dialect,
            timeouts=timeouts(settings),
            max_connections=settings.llm_max_connections + 4,
        )
        for url in settings.openai_urls()
    )


def timeouts(settings: Settings) -> Timeouts:
    return Timeouts(
        connect=settings.llm_connect_timeout_s,
        first_chunk=settings.llm_first_token_timeout_s,
        chunk=settings.llm_chunk_timeout_s,
    )


def _ollama_device(settings: Settings) -> Device | None:
    kind = settings.compute_device
    if kind is None:
        return None
    gpu = settings.gpu_device_id if kind == "cuda" else None
    return Device(kind, "as configured for the Ollama host", "COMPUTE_DEVICE", gpu)


async def load_llamacpp(settings: Settings) -> BackendChoice:
    """Load the embedded engine (blocking work runs off the event loop)."""
    from llm_service.backends.llamacpp import LlamaCppBackend, packaged_model_path

    device = await asyncio.to_thread(detect_device, settings.compute_device, settings.gpu_device_id)
    gpu_layers = llamacpp_gpu_layers(device)
    if gpu_layers and not _gpu_offload_supported():
        log.warning(
            "gpu_offload_unavailable",
            device=device.kind,
            detail="this llama-cpp-python build has no GPU support; running on the CPU."
            " Rebuild it with CMAKE_ARGS=-DGGML_CUDA=on (or -DGGML_METAL=on).",
        )
        gpu_layers = 0
    path = settings.llamacpp_model_path
    if path is None:
        path = await asyncio.to_thread(packaged_model_path)
    threads = settings.num_threads or max(1, (os.cpu_count() or 1) // settings.num_workers)
    backend = await asyncio.to_thread(
        LlamaCppBackend,
        path,
        context_window=settings.default_context_window,
        threads=threads,
        gpu_layers=gpu_layers,
        workers=settings.num_workers,
        queue_size=settings.llamacpp_queue_size,
        first_token_timeout=settings.llm_first_token_timeout_s,
        cache_bytes=settings.llamacpp_cache_bytes,
        extra_buffers={"on": True, "off": False}.get(settings.llamacpp_extra_buffers),
    )
    log.info(
        "embedded_engine_loaded",
        model=str(path),
        threads=threads,
        workers=settings.num_workers,
        gpu_layers=gpu_layers,
        context=backend.context_limit,
        trained_context=backend.trained_context,
        extra_buffers=backend.extra_buffers,
    )
    return BackendChoice((backend,), "", device)


def _gpu_offload_supported() -> bool:
    import llama_cpp

    return bool(llama_cpp.llama_supports_gpu_offload())


async def open_backend(settings: Settings) -> BackendChoice:
    """The engines `LLM_BACKEND` asks for, ready to serve."""
    kind = settings.llm_backend
    if kind == "ollama":
        device = _ollama_device(settings)
        return BackendChoice(make_ollama(settings, device), "LLM_BACKEND=ollama", device)
    if kind == "openai":
        return BackendChoice(make_openai(settings), "LLM_BACKEND=openai", None)
    if kind == "llamacpp":
        choice = await load_llamacpp(settings)
        return BackendChoice(choice.engines, "LLM_BACKEND=llamacpp", choice.device)
    device = _ollama_device(settings)
    ollamas = make_ollama(settings, device)
    statuses = await asyncio.gather(*(o.status() for o in ollamas))
    where = ", ".join(mask_url(url) for url in settings.ollama_urls())
    if any(status.reachable for status in statuses):
        return BackendChoice(ollamas, f"LLM_BACKEND=auto: Ollama answered at {where}", device)
    for ollama in ollamas:
        await ollama.aclose()
    choice = await load_llamacpp(settings)
    reason = (
        f"LLM_BACKEND=auto: Ollama did not answer at {where}, "
        "so the embedded llama.cpp engine serves"
    )
    return BackendChoice(choice.engines, reason, choice.device)
