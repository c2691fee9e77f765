"""The embedded llama.cpp engine with the real packaged model, through real sockets."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

# llama_cpp opens two files when imported and never closes them: imported here, at
# collection, rather than first inside a test, their close at exit raises no warning.
import llama_cpp  # noqa: F401
import pytest

from llm_service.backends.llamacpp import (
    _trained_context,
    _Workers,
    cpu_has_amx,
    packaged_model_path,
)
from llm_service.errors import EngineBusy, ModelFileError
from tests.fakes.ollama import FakeOllama
from tests.support import (
    Client,
    RunningService,
    bound_socket,
    embedded_engine,
    make_settings,
    running_service,
)
from tests.support import tokens_of as texts

pytestmark = pytest.mark.slow

SYSTEM = "You are a helpful assistant. Keep answers short."


def embedded(**overrides: Any) -> Any:
    return make_settings(llm_backend="llamacpp", **overrides)


async def configure(client: Client, **config: Any) -> None:
    await client.send(
        {"type": "start_session", "config": {"system_prompt": SYSTEM, "temperature": 0.0, **config}}
    )
    assert (await client.recv())["type"] == "session_configured"


async def reply(client: Client, text: str) -> tuple[str, dict[str, Any]]:
    frames = await client.turn(text, limit=60)
    assert frames[-1]["type"] == "response_complete", frames[-1]
    return "".join(texts(frames)), frames[-1]["stats"]


async def test_two_turns_remember_the_first() -> None:
    async with running_service(embedded()) as service:
        client = await service.connect()
        await client.start()
        await configure(client, max_tokens=48)
        await reply(client, "Hi! My name is Zorblax.")
        answer, stats = await reply(client, "What is my name?")
        assert "Zorblax" in answer
        assert stats["prompt_tokens"] > 20 and stats["tokens_generated"] >= 1

        # the name comes from the conversation, not from the question
        fresh = await service.connect()
        await fresh.start()
        await configure(fresh, max_tokens=48)
        alone, _ = await reply(fresh, "What is my name?")
        assert "Zorblax" not in alone
        await client.close()
        await fresh.close()


async def test_capital_of_france() -> None:
    async with running_service(embedded()) as service:
        client = await service.connect()
        await client.start()
        answer, stats = await reply(
            client, "What is the capital of France? Answer in one sentence."
        )
        assert "Paris" in answer
        assert stats["token_frames"] >= 2
        health = (await service.get("/health")).json()
        assert health["status"] == "healthy"
        assert health["backend"] == "llamacpp"
        assert health["model"] == "SmolLM2-135M-Instruct.Q4_1"
        assert health["device"]["kind"] == "cpu"
        assert health["context_window"] == 8192
        await client.close()


async def test_token_counts_come_from_the_model_tokenizer() -> None:
    from llama_cpp import _internals
    from llama_cpp import llama_cpp as lib

    params = lib.llama_model_default_params()
    params.vocab_only = True
    vocab = _internals.LlamaModel(
        path_model=str(packaged_model_path()), params=params, verbose=False
    )
    try:
        async with running_service(embedded()) as service:
            client = await service.connect()
            await client.start()
            await configure(client, max_tokens=40)
            answer, stats = await reply(client, "Name three colours.")
            assert stats["tokens_generated"] == len(
                vocab.tokenize(answer.encode(), add_bos=False, special=False)
            )
            await client.close()
    finally:
        vocab.close()  # type: ignore[no-untyped-call]


async def test_cancel_stops_within_a_token_and_frees_the_engine() -> None:
    async with running_service(embedded()) as service:
        client = await service.connect()
        await client.start()
        await configure(client, max_tokens=400)
        await client.send({"type": "user_message", "text": "Write a long story about a dragon."})
        first = []
        for _ in range(5):
            frame = await client.recv(limit=30)
            assert frame["type"] == "token"
            first.append(frame["data"])
        await client.send({"type": "cancel"})
        after = await client.recv_until("cancelled")
        stats = after[-1]["stats"]
        assert after[-1]["success"] is True
        assert stats["token_frames_after_cancel"] <= 1
        assert stats["token_frames"] == 5 + len(texts(after))
        # the worker is free by the time `cancelled` is sent
        health = (await service.get("/health")).json()
        assert "0/1 workers busy" in health["engine"]["detail"]
        history = await client.history()
        assert history[-1]["status"] == "interrupted"
        assert history[-1]["content"] == "".join(first + texts(after))
        answer, _ = await reply(client, "What is the capital of France? Answer in one sentence.")
        assert "Paris" in answer
        await client.close()


async def test_concurrent_sessions_get_whole_uninterleaved_answers() -> None:
    prompts = ["Name three fruits.", "What is the capital of Italy? Answer in one sentence."]
    async with running_service(embedded()) as service:
        clients = [await service.connect() for _ in prompts]
        for client in clients:
            await client.start()
            await configure(client, max_tokens=60)
        alone = [(await reply(c, p))[0] for c, p in zip(clients, prompts, strict=True)]
        for client in clients:
            await configure(client, max_tokens=60)  # fresh conversations, same config
        together = await asyncio.gather(
            *(reply(c, p) for c, p in zip(clients, prompts, strict=True))
        )
        assert [text for text, _ in together] == alone
        for client in clients:
            await client.close()


async def test_full_queue_is_a_clear_error() -> None:
    settings = embedded(llamacpp_queue_size=0, llm_retry_attempts=1)
    async with running_service(settings) as service:
        first, second = await service.connect(), await service.connect()
        for client in (first, second):
            await client.start()
            await configure(client, max_tokens=300)
        await first.send({"type": "user_message", "text": "Write a long story about a cat."})
        assert (await first.recv(limit=30))["type"] == "token"
        frames = await second.turn("Hello")
        error = frames[-1]["error"]
        assert error["code"] == "upstream_unavailable" and "busy" in error["message"]
        # shedding load is not an engine failure: the breaker does not count it
        breaker = (await service.get("/health")).json()["circuit_breaker"]
        assert breaker["consecutive_failures"] == 0
        await first.send({"type": "cancel"})
        await first.recv_until("cancelled")
        answer, _ = await reply(second, "Hello")
        assert answer
        await first.close()
        await second.close()


async def backend_of(service: RunningService) -> dict[str, Any]:
    health: dict[str, Any] = (await service.get("/health")).json()
    return health


async def test_auto_uses_the_embedded_engine_when_ollama_is_closed() -> None:
    closed = bound_socket()  # bound, never listening
    try:
        url = f"http://127.0.0.1:{closed.getsockname()[1]}"
        async with running_service(
            make_settings(llm_backend="auto", ollama_base_url=url)
        ) as service:
            health = await backend_of(service)
            assert health["backend"] == "llamacpp"
            assert "did not answer" in health["backend_reason"]
            assert health["ollama_connection"] is None
    finally:
        closed.close()


async def test_auto_uses_ollama_when_it_answers(fake_ollama: FakeOllama) -> None:
    async with running_service(
        make_settings(llm_backend="auto", ollama_base_url=fake_ollama.url)
    ) as service:
        health = await backend_of(service)
        assert health["backend"] == "ollama"
        assert "Ollama answered" in health["backend_reason"]
        client = await service.connect()
        await client.start()
        frames = await client.turn("hi")
        assert frames[-1]["type"] == "response_complete"
        assert len(fake_ollama.chats) == 1
        await client.close()


def test_model_loading_sets_the_extra_buffers_only_while_models_load() -> None:
    from llama_cpp import llama_cpp as lib

    from llm_service.backends.llamacpp import model_loading

    before = lib.llama_model_default_params().use_extra_bufts
    for wanted in (False, True):
        with model_loading(wanted):
            assert lib.llama_model_default_params().use_extra_bufts is wanted
        assert lib.llama_model_default_params().use_extra_bufts is before


async def test_the_embedded_engine_answers_with_extra_buffers_off() -> None:
    # what LLAMACPP_EXTRA_BUFFERS=auto chooses on a CPU that reports AMX
    async with running_service(embedded(llamacpp_extra_buffers="off")) as service:
        client = await service.connect()
        await client.start()
        await configure(client, max_tokens=24)
        answer, _ = await reply(client, "What is the capital of France? Answer in one sentence.")
        assert "Paris" in answer
        assert (await service.get("/health")).json()["status"] == "healthy"
        await client.close()


async def refusal(queue_size: int) -> str:
    """The message of a turn refused by one busy worker with `queue_size` turns waiting."""
    workers = _Workers([object()], max_waiting=queue_size)
    await workers.acquire()
    waiting = [asyncio.create_task(workers.acquire()) for _ in range(queue_size)]
    await asyncio.sleep(0)  # each queues itself
    assert len(workers._waiting) == queue_size
    try:
        with pytest.raises(EngineBusy) as busy:
            await workers.acquire()
        return busy.value.message
    finally:
        for task in waiting:
            task.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)


async def test_a_full_queue_says_how_busy_the_engine_is() -> None:
    assert await refusal(1) == (
        "the embedded engine is busy: 1 of 1 workers generating, 1 turn waiting "
        "(LLAMACPP_QUEUE_SIZE); retry shortly"
    )
    assert await refusal(2) == (
        "the embedded engine is busy: 1 of 1 workers generating, 2 turns waiting "
        "(LLAMACPP_QUEUE_SIZE); retry shortly"
    )


async def test_a_worker_handed_to_a_turn_cancelled_at_that_moment_goes_back() -> None:
    model = object()
    workers = _Workers([model], max_waiting=4)
    assert await workers.acquire() is model
    waiter = asyncio.create_task(workers.acquire())
    await asyncio.sleep(0)  # it waits for the one worker
    workers.release(model)  # handed over ...
    waiter.cancel()  # ... and cancelled before it could run
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert workers.busy == 0 and await workers.acquire() is model
    # a turn cancelled while still waiting leaves the queue, and the worker stays free for
    # the next one
    waiter = asyncio.create_task(workers.acquire())
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert len(workers._waiting) == 0
    workers.release(model)
    assert await workers.acquire() is model


@pytest.mark.parametrize("extra_buffers", [False, None])  # None: LLAMACPP_EXTRA_BUFFERS=auto
async def test_each_setting_reaches_the_loaded_models_and_loading_writes_no_log(
    capfd: pytest.CaptureFixture[str], extra_buffers: bool | None
) -> None:
    from llama_cpp._logger import set_verbose

    from llm_service.backends.llamacpp import extra_buffers_default

    threads = max((os.cpu_count() or 1) // 2, 1) + 1  # not llama-cpp-python's own choice
    # llama.cpp's log level is the process's: as a verbose model loaded earlier leaves it
    set_verbose(True)
    try:
        backend = await asyncio.to_thread(
            embedded_engine,
            context_window=1024,
            threads=threads,
            gpu_layers=1,  # its own default is 0; a CPU build keeps every layer on the CPU
            workers=2,
            cache_bytes=0,
            extra_buffers=extra_buffers,
        )
    finally:
        set_verbose(False)
    try:
        assert capfd.readouterr() == ("", "")
        wanted = extra_buffers_default() if extra_buffers is None else extra_buffers
        assert backend.extra_buffers is wanted
        assert backend.prompt_cache is None  # LLAMACPP_CACHE_BYTES=0: off
        assert len(backend._models) == 2
        for model in backend._models:
            assert model.n_ctx() == 1024  # not llama-cpp-python's default of 512
            assert model.n_threads == threads
            assert model.model_params.n_gpu_layers == 1
            assert model.model_params.use_extra_bufts is wanted
    finally:
        await backend.aclose()


def test_a_model_file_that_is_not_there_is_named_in_the_error(tmp_path: Path) -> None:
    missing = tmp_path / "absent.gguf"
    with pytest.raises(ModelFileError) as error:
        embedded_engine(missing)
    assert str(error.value) == f"model file not found: {missing} (LLAMACPP_MODEL_PATH)"


def test_the_packaged_model_is_the_gguf_file_its_package_installed() -> None:
    path = packaged_model_path()
    assert (path.name, path.is_file()) == ("SmolLM2-135M-Instruct.Q4_1.gguf", True)


def test_a_model_package_that_is_not_installed_is_named_with_how_to_install_it() -> None:
    with pytest.raises(ModelFileError) as error:
        packaged_model_path("no-such-model-package")
    assert str(error.value) == (
        "the package no-such-model-package is not installed (pip install -r requirements.txt),"
        " and LLAMACPP_MODEL_PATH is not set"
    )


def test_a_model_package_without_a_gguf_file_is_named() -> None:
    with pytest.raises(ModelFileError) as error:
        packaged_model_path("orjson")  # installed, and holds no model
    assert str(error.value) == "the package orjson holds no .gguf file"


@pytest.mark.parametrize(
    ("metadata", "trained"),
    [
        (
            {
                "general.architecture": "qwen2",
                "qwen2.context_length": "32768",
                "llama.context_length": "2048",
            },
            32768,
        ),
        ({"llama.context_length": "8192"}, 8192),  # no architecture named: llama's key
    ],
)
def test_the_trained_context_is_read_under_the_models_architecture(
    metadata: dict[str, str], trained: int
) -> None:
    assert _trained_context(metadata) == trained


@pytest.mark.parametrize(
    ("metadata", "why"),
    [
        ({"general.architecture": "qwen2"}, "'qwen2.context_length'"),
        ({"llama.context_length": "many"}, "invalid literal for int() with base 10: 'many'"),
    ],
)
def test_a_model_file_without_a_readable_context_length_is_refused_saying_why(
    metadata: dict[str, str], why: str
) -> None:
    with pytest.raises(ModelFileError) as error:
        _trained_context(metadata)
    assert str(error.value) == f"the model file does not say its context length ({why})"


@pytest.mark.parametrize(
    ("cpuinfo", "amx"),
    [
        ("processor\t: 0\nflags\t\t: fpu sse2 avx512f amx_bf16 amx_tile amx_int8\n", True),
        ("processor\t: 0\nflags\t\t: fpu sse2 avx2\n", False),
        ("model name\t: amx_int8 in a name is not a flag\nflags\t\t: fpu\n", False),
        (None, False),  # no such file: not Linux, or no /proc
    ],
)
def test_amx_is_read_from_the_cpus_flags(tmp_path: Path, cpuinfo: str | None, amx: bool) -> None:
    path = tmp_path / "cpuinfo"
    if cpuinfo is not None:
        path.write_text(cpuinfo)
    assert cpu_has_amx(str(path)) is amx
