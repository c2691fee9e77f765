"""The command line: `websocket` runs the service, `test` checks the engine, `config` shows it.

Settings come from the environment and `.env`; command-line options override them. A bad
setting, a model file or device that is not there, a port that is taken: each stops the
command with one message naming the variable or the port, and exit status 2.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import aclosing
from typing import Annotated, Any

import typer

from llm_service.backends import open_backend
from llm_service.backends.base import ChatMessage, ChatRequest, LLMBackend, StreamEnd
from llm_service.backends.ollama import OllamaBackend
from llm_service.config import Settings, load_settings
from llm_service.device import detect_device
from llm_service.errors import ConfigError, DeviceUnavailableError, ServiceError, StartupError

cli = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="FastTalk LLM service: WebSocket LLM streaming.",
)

_TEST_PROMPT = "Say hello in five words."


def _settings(**overrides: Any) -> Settings:
    try:
        return load_settings(**{k: v for k, v in overrides.items() if v is not None})
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc


@cli.command()
def websocket(
    host: Annotated[str | None, typer.Option(help="Interface to listen on (LLM_HOST)")] = None,
    port: Annotated[int | None, typer.Option(help="WebSocket/HTTP port (LLM_PORT)")] = None,
    model: Annotated[str | None, typer.Option(help="Model name (LLM_MODEL)")] = None,
    log_level: Annotated[str | None, typer.Option(help="DEBUG, INFO, WARNING, ERROR")] = None,
) -> None:
    """Run the service: /ws/llm, /health and /stats, plus /metrics on the monitoring port."""
    from llm_service.logs import configure_logging
    from llm_service.server import run

    settings = _settings(llm_host=host, llm_port=port, llm_model=model, log_level=log_level)
    configure_logging(settings.log_level, settings.log_format)
    try:
        run(settings)
    except StartupError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc


@cli.command("test")
def test_engine(
    model: Annotated[str | None, typer.Option(help="Model name (LLM_MODEL)")] = None,
    pull: Annotated[
        bool, typer.Option("--pull", help="Pull LLM_MODEL through Ollama if it is missing")
    ] = False,
) -> None:
    """Check the engine as an operator would: reachable, version, model, a short generation."""
    settings = _settings(llm_model=model)
    ok = asyncio.run(_check_engine(settings, pull, model_asked=model is not None))
    raise typer.Exit(0 if ok else 1)


async def _pull(backend: OllamaBackend) -> str | None:
    """Pull the model with a progress bar; what went wrong, or None."""
    typer.echo(f"pull      {backend.model} from Ollama's library")
    last_status = ""
    try:
        async for step in backend.pull():
            if step.total and step.completed is not None:
                done = step.completed / step.total
                bar = "#" * int(done * 30)
                typer.echo(
                    f"\r          [{bar:<30}] {done:6.1%} of {step.total / 1e6:,.0f} MB", nl=False
                )
            elif step.status != last_status:
                typer.echo(
                    ("\n" if last_status.startswith("pulling ") else "")
                    + f"          {step.status}"
                )
            last_status = step.status
    except ServiceError as exc:
        typer.echo("")
        return f"pull failed [{exc.code}]: {exc.message}"
    return None


async def _check_engine(settings: Settings, pull: bool = False, model_asked: bool = False) -> bool:
    typer.echo(f"backend   LLM_BACKEND={settings.llm_backend}")
    try:
        choice = await open_backend(settings)
    except StartupError as exc:
        return _verdict(False, str(exc))
    engines = choice.engines
    try:
        typer.echo(f"engine    {engines[0].name}: {choice.reason}")
        if engines[0].name == "llamacpp" and (pull or model_asked):
            option = "--pull" if pull else "--model"
            return _verdict(
                False,
                f"{option} applies to Ollama, which names and pulls models; the embedded engine "
                "runs one GGUF file (LLAMACPP_MODEL_PATH, or the packaged SmolLM2). Run "
                "Ollama (or set LLM_BACKEND=ollama) to use it",
            )
        if pull and engines[0].name != "ollama":
            return _verdict(
                False,
                "--pull applies to Ollama; an OpenAI-compatible engine "
                "serves the models it was started with",
            )
        if choice.device is not None:
            typer.echo(
                f"device    {choice.device.kind} ({choice.device.name}, "
                f"from {choice.device.source})"
            )
        for backend in engines:
            problem = await _check_one(backend, settings, pull)
            if problem is not None:
                return _verdict(False, problem)
        return _verdict(
            True, "the engine is ready" if len(engines) == 1 else f"all {len(engines)} are ready"
        )
    finally:
        for backend in engines:
            await backend.aclose()


async def _check_one(backend: LLMBackend, settings: Settings, pull: bool) -> str | None:
    """Check one engine; what is wrong with it, or None."""
    status = await backend.status()
    if not status.reachable:
        return f"the engine cannot be reached: {status.detail}"
    typer.echo(f"reachable yes, {status.detail}, version {status.version}")
    if status.model_available is False and pull and isinstance(backend, OllamaBackend):
        failed = await _pull(backend)
        if failed is not None:
            return failed
        status = await backend.status()
    if status.model_available is False:
        if isinstance(backend, OllamaBackend):
            how = f"pull it first (python main.py test --pull, or ollama pull {backend.model})"
        else:
            how = "set LLM_MODEL to a model id that the engine's /v1/models lists"
        return f"model {backend.model!r} is not served by {status.detail}; {how}"
    typer.echo(f"model     {backend.model} present")
    try:
        tokens, first_ms, speed = await _short_generation(backend, settings)
    except ServiceError as exc:
        return f"generation failed [{exc.code}]: {exc.message}"
    typer.echo(f"generate  {tokens} tokens, first after {first_ms:.0f} ms, {speed:.1f} tokens/s")
    return None


async def _short_generation(backend: LLMBackend, settings: Settings) -> tuple[int, float, float]:
    request = ChatRequest(
        [ChatMessage("user", _TEST_PROMPT)],
        settings.default_sampling().updated({"temperature": 0.0, "max_tokens": 24}),
        context_window=min(2048, settings.default_context_window),
    )
    started = time.perf_counter()
    first: float | None = None
    frames = 0
    end = StreamEnd()
    async with aclosing(backend.stream_chat(request)) as s:
        async for item in s:
            if isinstance(item, str):
                frames += 1
                first = first or time.perf_counter()
            elif isinstance(item, StreamEnd):
                end = item
    elapsed = time.perf_counter() - started
    tokens = end.completion_tokens if end.completion_tokens is not None else frames
    speed = end.engine_tokens_per_second or (tokens / elapsed if elapsed else 0.0)
    return tokens, ((first or time.perf_counter()) - started) * 1000, speed


def _verdict(ok: bool, message: str) -> bool:
    typer.echo(f"verdict   {'OK' if ok else 'FAILED'}: {message}", err=not ok)
    return ok


@cli.command()
def config(
    show: Annotated[
        bool, typer.Option("--show", help="Print the effective configuration (the default)")
    ] = True,
) -> None:
    """Show the effective configuration (environment, .env and defaults), secrets masked."""
    settings = _settings()
    shown = settings.shown()
    width = max(len(name) for name in shown)
    for name, value in shown.items():
        typer.echo(f"{name:<{width}}  {value}")
    typer.echo(f"# device on this host: {_describe_device(settings)}")


def _describe_device(settings: Settings) -> str:
    try:
        device = detect_device(settings.compute_device, settings.gpu_device_id)
    except DeviceUnavailableError as exc:
        return f"unavailable: {exc}"
    note = (
        "" if settings.compute_device else "; Ollama chooses its own unless COMPUTE_DEVICE is set"
    )
    return f"{device.kind} ({device.name}, from {device.source}){note}"


def main() -> None:
    cli()
