"""Conversations: per-session history, the context budget, and one turn at a time.

A `Conversation` holds the system prompt and the user/assistant turns in order. Each user
message is admitted first (`TurnLimits`: its length, the turn rate), then becomes a `Turn`:
the prompt is cut to fit the context window (the oldest whole turns go first; the system
prompt and the new message always stay, and a message that cannot fit is refused with
`context_overflow`), the reply is streamed from the backend, and when the turn ends the
history is updated by one rule: the assistant text stored is exactly the text handed on and
delivered (a chunk counts once its consumer asks for the next one, so a chunk whose send was
cut short is not stored). A turn cut short by a cancel, a disconnect or an engine failure
keeps the user message and the partial reply together, marked `interrupted` or `incomplete`;
a turn that produced no text at all leaves the history as it was.

Each reply has a `response_id` (the client's, or one made here), kept on its history entry
so a voice client can `truncate` it to what the user heard: the entry is cut to that prefix,
marked `interrupted`, and its tokens counted again. With `chunking` set, the reply is handed
on in clauses or sentences (`chunking.py`); the stored text is still exactly what was handed
on, and a piece held when the reply is cancelled is handed on with the cancel.

Token counts come from the engine where it reports them (`StreamEnd.prompt_tokens`,
`completion_tokens`, or the backend's own tokenizer); `estimate_tokens` covers text not yet
counted. Everything here is plain values: the wire shapes live in `protocol.py`.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import AsyncGenerator, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

from llm_service.backends.base import (
    ChatMessage,
    ChatRequest,
    LLMBackend,
    Role,
    StreamEnd,
    StreamItem,
    ToolCall,
    ToolCalls,
)
from llm_service.chunking import Chunker
from llm_service.errors import (
    ContextOverflow,
    InvalidConfig,
    InvalidMessage,
    MalformedToolCall,
    MessageTooLong,
    RateLimited,
    ServiceError,
)
from llm_service.metrics import Telemetry
from llm_service.sampling import SamplingParams
from llm_service.timing import SlidingWindow
from llm_service.tracing import OFF, Parent, Tracing, TurnTrace

# What a chat template adds around each message (role markers, separators), and the header
# that opens the assistant's reply. Used with estimates and exact counts alike.
MESSAGE_OVERHEAD = 4
REPLY_PRIMER = 3
TRIM_BLOCK = 4  # a full window drops turns until a 1/TRIM_BLOCK of it is free

Status = Literal["complete", "interrupted", "incomplete", "streaming"]
Chunking = Literal["none", "clause", "sentence"]
# "auto" (the engine's default), "none", "required", or {"type": "function", "function":
# {"name": ...}}: the shape of OpenAI's tool_choice.
ToolChoice = str | dict[str, Any]
MAX_RESPONSE_ID = 64


def estimate_tokens(text: str) -> int:
    """A deliberately generous token estimate for text no engine has counted yet.

    About four characters a token for ASCII text; non-ASCII characters (accents, CJK, emoji)
    cost more bytes and usually more tokens, so each extra UTF-8 byte adds half a token.
    """
    chars = len(text)
    extra_bytes = len(text.encode()) - chars
    return math.ceil(chars / 4) + (extra_bytes + 1) // 2


# how a turn's status is counted (metrics' `outcome`) and traced
OUTCOME_LABELS: dict[Status, str] = {
    "complete": "completed",
    "interrupted": "cancelled",
    "incomplete": "failed",
}


@dataclass(frozen=True, slots=True)
class SessionConfig:
    """A session's effective settings: its system prompt and how its replies are sampled."""

    system_prompt: str
    sampling: SamplingParams
    chunking: Chunking = "none"  # what one token frame holds: an engine chunk, or a piece
    tools: tuple[Mapping[str, Any], ...] = ()  # the functions the model may call
    tool_choice: ToolChoice = "auto"  # whether, and which, it must call

    def updated(
        self,
        system_prompt: str | None,
        sampling: Mapping[str, Any],
        context_window: int,
        chunking: Chunking | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        tool_choice: ToolChoice | None = None,
    ) -> SessionConfig:
        """This config with what the client set; raises `InvalidConfig` if it cannot work."""
        new = SessionConfig(
            self.system_prompt if system_prompt is None else system_prompt,
            self.sampling.updated(sampling),
            self.chunking if chunking is None else chunking,
            self.tools if tools is None else tuple(tools),
            self.tool_choice if tool_choice is None else tool_choice,
        )
        if (wrong := new.wrong_choice(new.tool_choice)) is not None:
            raise InvalidConfig(f"tool_choice: {wrong}")
        max_tokens = new.sampling.max_tokens
        if max_tokens >= context_window:
            raise InvalidConfig(
                f"max_tokens ({max_tokens}) must be smaller than the context window "
                f"({context_window}), which must also hold the prompt"
            )
        return new

    def wrong_choice(self, choice: ToolChoice) -> str | None:
        """What is wrong with `choice` for these tools, if anything."""
        if isinstance(choice, dict):
            name = choice["function"]["name"]
            if name not in {t["function"]["name"] for t in self.tools}:
                return f"no tool of the session is named {name!r}"
        elif choice == "required" and not self.tools:
            return "'required' needs tools"
        return None


@dataclass(frozen=True, slots=True)
class TurnLimits:
    """What a turn must respect to be admitted (0 turns a limit off)."""

    max_chars: int = 0
    per_minute: int = 0
    max_history_turns: int = 0


@dataclass(slots=True)
class Entry:
    """One message of the history, with its token count (template overhead included)."""

    role: Role
    content: str
    tokens: int
    status: Status = "complete"
    response_id: str | None = None  # an assistant entry's reply
    tool_calls: tuple[ToolCall, ...] = ()  # an assistant entry's calls
    tool_call_id: str | None = None  # a tool entry: the call it answers
    tool_name: str | None = None


@dataclass(slots=True)
class TurnStats:
    """The figures of one turn, as sent in `response_complete` and `cancelled`."""

    tokens_generated: int
    processing_time_ms: float
    tokens_per_second: float
    time_to_first_token_ms: float | None
    prompt_tokens: int
    history_trimmed_turns: int
    token_frames: int
    done_reason: str | None = None
    engine_tokens_per_second: float | None = None
    time_to_first_chunk_ms: float | None = None  # with chunking: the first piece
    prompt_tokens_cached: int | None = None  # of prompt_tokens, the engine's cache held


@dataclass(frozen=True, slots=True)
class SessionSummary:
    """The figures of a whole session, as sent in `session_ended`."""

    turns: int
    tokens_generated: int
    history_messages: int
    duration_s: float


class Turn:
    """One user message and the reply streamed for it."""

    def __init__(
        self,
        conversation: Conversation,
        user: Entry | None,
        prompt: list[ChatMessage],
        prompt_tokens: int,
        dropped: int,
        response_id: str,
    ) -> None:
        self._conversation = conversation
        self.user = user
        self.prompt = prompt
        self.prompt_tokens = prompt_tokens
        self.dropped = dropped
        self.response_id = response_id
        self.started_at = time.perf_counter()
        self.first_token_at: float | None = None
        self.first_piece_at: float | None = None
        self.parts: list[str] = []  # the chunks (or pieces) delivered so far
        self.engine_chunks = 0  # with chunking: the chunks the engine streamed
        self.end: StreamEnd | None = None
        self.finished_at: float | None = None
        mode = conversation.config.chunking
        self._chunker = None if mode == "none" else Chunker(mode)
        self.flush_on_stop = False  # a cancel: the piece held goes out with it
        self.flushed = ""  # what that flush handed on
        self.calls: tuple[ToolCall, ...] = ()  # the tools the model called
        self.dropped_turns = 0
        self.tool_choice: ToolChoice = conversation.config.tool_choice
        self.trace: TurnTrace | None = None  # its spans, when tracing is on
        self.error: ServiceError | None = None  # what ended it, when it failed

    async def stream(self) -> AsyncGenerator[str | TurnStats, None]:
        """Yield the reply's text chunks, then its `TurnStats`; update the history at the end."""
        conv = self._conversation
        outcome: Status = "incomplete"
        request = ChatRequest(
            self.prompt,
            conv.config.sampling,
            conv.context_window,
            conv.session_id,
            conv.config.tools,
            self.tool_choice,
            self.trace,
        )
        trace = self.trace
        try:
            async with aclosing(conv.backend.stream_chat(request)) as chunks:
                if self._chunker is not None:
                    pieces = self._pieces(self._timed(chunks), self._chunker)
                    async with aclosing(pieces):
                        async for piece in pieces:
                            yield piece
                else:  # the hot path: the chunks as they come, no layer between
                    inter_token = conv.telemetry.inter_token
                    parts = self.parts
                    last = 0.0
                    async for item in chunks:
                        if type(item) is str:
                            now = time.perf_counter()
                            if last:
                                inter_token.observe(now - last)
                            else:
                                self.first_token_at = now
                                if trace is not None:
                                    trace.first_token()
                            last = now
                            yield item
                            parts.append(item)  # asked for more: the chunk was delivered
                        elif isinstance(item, StreamEnd):
                            self.end = item
                        elif isinstance(item, ToolCalls):
                            self.calls = item.calls
            outcome = "complete"
        except MalformedToolCall as exc:
            conv.telemetry.tool_calls("malformed")
            self.error = exc
            raise
        except (asyncio.CancelledError, GeneratorExit):
            outcome = "interrupted"
            raise
        except ServiceError as exc:
            self.error = exc
            raise
        finally:
            self.finished_at = time.perf_counter()
            conv._finish(self, outcome)
            if trace is not None:
                self._end_trace(trace, outcome)
        yield self.stats()

    def _end_trace(self, trace: TurnTrace, outcome: Status) -> None:
        stats = self.stats()
        error = self.error
        reason = stats.done_reason
        trace.finish(
            OUTCOME_LABELS[outcome],
            {
                "gen_ai.usage.input_tokens": stats.prompt_tokens,
                "gen_ai.usage.output_tokens": stats.tokens_generated,
                "gen_ai.response.finish_reasons": [reason] if reason else None,
                "llm_service.prompt_tokens_cached": stats.prompt_tokens_cached,
                "llm_service.token_frames": stats.token_frames,
                "llm_service.history_trimmed_turns": stats.history_trimmed_turns,
                "llm_service.time_to_first_token_ms": stats.time_to_first_token_ms,
            },
            None if error is None else (error.code, error.message),
        )

    async def _timed(self, chunks: AsyncGenerator[StreamItem, None]) -> AsyncGenerator[str, None]:
        """The engine's text chunks, timed as the hot path times them; its `StreamEnd` kept."""
        inter_token = self._conversation.telemetry.inter_token
        last = 0.0
        async for item in chunks:
            if type(item) is str:
                now = time.perf_counter()
                if last:
                    inter_token.observe(now - last)
                else:
                    self.first_token_at = now
                    if self.trace is not None:
                        self.trace.first_token()
                last = now
                yield item
            elif isinstance(item, StreamEnd):
                self.end = item
            elif isinstance(item, ToolCalls):
                self.calls = item.calls

    async def _pieces(
        self, chunks: AsyncGenerator[str, None], chunker: Chunker
    ) -> AsyncGenerator[str, None]:
        """The reply in clauses or sentences, each recorded as delivered once the next is
        asked for; the rest when the reply ends, or, on a cancel, when it stops between
        pieces (a piece whose send was cut short ends it: nothing after it is handed on)."""
        parts = self.parts
        between = True  # not suspended on a piece being sent
        try:
            async with aclosing(chunks):
                async for chunk in chunks:
                    self.engine_chunks += 1
                    for piece in chunker.feed(chunk):
                        if self.first_piece_at is None:
                            self.first_piece_at = time.perf_counter()
                        between = False
                        yield piece
                        parts.append(piece)
                        between = True
            if rest := chunker.flush():
                if self.first_piece_at is None:
                    self.first_piece_at = time.perf_counter()
                yield rest
                parts.append(rest)
        except (asyncio.CancelledError, GeneratorExit):
            if self.flush_on_stop and between and (rest := chunker.flush()):
                parts.append(rest)
                self.flushed = rest
            raise

    def stats(self) -> TurnStats:
        end = self.end or StreamEnd()
        now = self.finished_at or time.perf_counter()
        elapsed = now - self.started_at
        frames = len(self.parts)
        counted = self.engine_chunks if self._chunker is not None else frames
        tokens = end.completion_tokens if end.completion_tokens is not None else counted
        ttft = None if self.first_token_at is None else (self.first_token_at - self.started_at)
        ttfc = None if self.first_piece_at is None else (self.first_piece_at - self.started_at)
        return TurnStats(
            tokens_generated=tokens,
            processing_time_ms=elapsed * 1000,
            tokens_per_second=tokens / elapsed if elapsed > 0 else 0.0,
            time_to_first_token_ms=None if ttft is None else ttft * 1000,
            prompt_tokens=end.prompt_tokens or self.prompt_tokens,
            history_trimmed_turns=self.dropped_turns,
            token_frames=frames,
            done_reason=end.done_reason,
            engine_tokens_per_second=end.engine_tokens_per_second,
            prompt_tokens_cached=end.prompt_cached_tokens,
            time_to_first_chunk_ms=None if ttfc is None else ttfc * 1000,
        )


@dataclass
class Conversation:
    """One session's history and settings."""

    session_id: str
    config: SessionConfig
    backend: LLMBackend
    context_window: int
    telemetry: Telemetry
    limits: TurnLimits = TurnLimits()
    system: Entry | None = None
    entries: list[Entry] = field(default_factory=list)
    turns: int = 0
    tokens_generated: int = 0
    started_at: float = field(default_factory=time.monotonic)
    current: Turn | None = None  # the turn whose reply is streaming
    tracing: Tracing = OFF
    _rate: SlidingWindow = field(init=False)

    def __post_init__(self) -> None:
        self._rate = SlidingWindow(self.limits.per_minute)
        self.reset(self.config)

    def reset(self, config: SessionConfig) -> None:
        """Start afresh with `config`: the system prompt alone in the history."""
        self.config = config
        self.entries = []
        self.current = None
        prompt = config.system_prompt
        self.system = Entry("system", prompt, self.count(prompt)) if prompt else None
        tools = config.tools
        self.tools_tokens = self.count(orjson.dumps(tools).decode()) if tools else 0

    def count(self, text: str, calls: Sequence[ToolCall] = ()) -> int:
        """The tokens a message takes in the prompt: its text, and its calls as JSON."""
        if calls:
            text += orjson.dumps([(c.id, c.name, c.arguments) for c in calls]).decode()
        exact = self.backend.count_tokens(text)
        return (exact if exact is not None else estimate_tokens(text)) + MESSAGE_OVERHEAD

    @property
    def pending_calls(self) -> tuple[ToolCall, ...]:
        """The calls of the latest reply while no result has answered them."""
        last = self.entries[-1] if self.entries else None
        return last.tool_calls if last is not None and last.role == "assistant" else ()

    def start_turn(
        self,
        text: str,
        response_id: str | None = None,
        tool_choice: ToolChoice | None = None,
        parent: Parent | None = None,
    ) -> Turn:
        """Admit `text` and plan its turn: the prompt that fits the window, oldest turns
        dropped. Only a turn that is started counts against the rate limit."""
        limits = self.limits
        if limits.max_chars and len(text) > limits.max_chars:
            raise MessageTooLong(
                f"the message has {len(text)} characters; the limit is {limits.max_chars}"
            )
        self._check_choice(tool_choice)
        self._admit()
        pending = self.pending_calls
        if pending:  # abandoned: answered as cancelled, so no call is left dangling
            self._answer(pending, [(c.id, "cancelled") for c in pending])
        try:
            turn = self._plan(Entry("user", text, self.count(text)), response_id)
        except ContextOverflow:
            del self.entries[len(self.entries) - len(pending) :]
            raise
        if pending:
            self.telemetry.tool_calls("cancelled", len(pending))
        return self._started(turn, tool_choice, parent)

    def answer_tools(
        self,
        results: Sequence[tuple[str, str]],
        response_id: str | None,
        tool_choice: ToolChoice | None = None,
        parent: Parent | None = None,
    ) -> Turn:
        """`tool_result`: the results of every pending call join the history, and the model's
        follow-up reply is planned as a turn of its own. Results that do not answer exactly
        the pending calls are an `InvalidMessage`, and nothing changes."""
        pending = self.pending_calls
        if not pending:
            raise InvalidMessage("tool_result: no tool call is waiting for a result")
        ids = [call_id for call_id, _ in results]
        wanted = {c.id for c in pending}
        if len(set(ids)) != len(ids):
            raise InvalidMessage("tool_result: a call has more than one result")
        if unknown := [i for i in ids if i not in wanted]:
            raise InvalidMessage(f"tool_result: no pending call has the id {unknown[0][:64]!r}")
        if missing := [c.id for c in pending if c.id not in set(ids)]:
            raise InvalidMessage(f"tool_result: no result for the call {missing[0]!r}")
        self._check_choice(tool_choice)
        self._admit()
        self._answer(pending, results)
        try:
            turn = self._plan(None, response_id)
        except ContextOverflow:
            del self.entries[len(self.entries) - len(pending) :]
            raise
        self.telemetry.tool_calls("answered", len(pending))
        return self._started(turn, tool_choice, parent)

    def _admit(self) -> None:
        wait = self._rate.wait()
        if wait:
            limits = self.limits
            raise RateLimited(
                f"at most {limits.per_minute} turns a minute on one connection; retry later",
                retry_after_ms=max(1, round(wait * 1000)),
            )

    def _answer(self, calls: Sequence[ToolCall], results: Sequence[tuple[str, str]]) -> None:
        """Tool entries for `calls`, in their order, from `results` (id, content)."""
        content = dict(results)
        for call in calls:
            text = content[call.id]
            entry = Entry("tool", text, self.count(text), tool_call_id=call.id, tool_name=call.name)
            self.entries.append(entry)

    def _check_choice(self, choice: ToolChoice | None) -> None:
        if choice is not None and (wrong := self.config.wrong_choice(choice)) is not None:
            raise InvalidMessage(f"tool_choice: {wrong}")

    def _started(self, turn: Turn, tool_choice: ToolChoice | None, parent: Parent | None) -> Turn:
        if tool_choice is not None:
            turn.tool_choice = tool_choice
        backend = self.backend
        turn.trace = self.tracing.turn(
            self.session_id, turn.response_id, backend.model, backend.name, parent
        )
        self._rate.record()
        self.current = turn
        return turn

    def _plan(self, user: Entry | None, response_id: str | None) -> Turn:
        """The prompt for a turn, fitted to the window by dropping whole turns, oldest first.
        A turn is a user message and all that answers it (replies, calls, their results);
        `user` None plans the follow-up to tool results, whose own turn is never dropped."""
        entries = self.entries
        max_tokens = self.config.sampling.max_tokens
        budget = self.context_window - max_tokens - REPLY_PRIMER
        # where each turn starts; what comes before the first user message is a turn of its own
        starts = [i for i, e in enumerate(entries) if i == 0 or e.role == "user"]
        fixed = self.tools_tokens + (self.system.tokens if self.system else 0)
        droppable = len(starts)
        if user is not None:
            fixed += user.tokens
        elif starts:
            droppable -= 1  # the turn the results answer
        if fixed + (0 if user else sum(e.tokens for e in entries[starts[-1] :])) > budget:
            raise ContextOverflow(
                f"the {'message' if user else 'turn with its tool results'}, the system "
                f"prompt and the tools need more than the {budget} tokens the context window "
                f"({self.context_window}) leaves beside max_tokens ({max_tokens})"
            )

        def boundary(turns: int) -> int:  # where the history starts once `turns` are gone
            return starts[turns] if turns < len(starts) else len(entries)

        # LLM_MAX_HISTORY_TURNS first (the turn planned counts), then the context budget.
        cap = self.limits.max_history_turns
        drop = max(0, droppable + 1 - cap) if cap else 0  # cap >= 1: never past droppable
        total = fixed + sum(e.tokens for e in entries[boundary(drop) :])
        if total > budget:
            # Full: free a block (a quarter of the window) at once, so the turns after this
            # one extend the same prompt, which engines read from their cache, instead of
            # shifting its start, and so everything after it, every turn.
            goal = budget - self.context_window // TRIM_BLOCK
            while total > goal and drop < droppable:
                total -= sum(e.tokens for e in entries[boundary(drop) : boundary(drop + 1)])
                drop += 1
        dropped = boundary(drop)
        kept = ([self.system] if self.system else []) + entries[dropped:]
        if user is not None:
            kept.append(user)
        prompt = [
            ChatMessage(e.role, e.content, e.tool_calls, e.tool_call_id, e.tool_name) for e in kept
        ]
        turn = Turn(
            self, user, prompt, total + REPLY_PRIMER, dropped, response_id or new_response_id()
        )
        turn.dropped_turns = drop
        return turn

    def _finish(self, turn: Turn, outcome: Status) -> None:
        self.current = None
        stats = turn.stats()
        calls = turn.calls if outcome == "complete" else ()
        if turn.parts or outcome == "complete":
            reply = "".join(turn.parts)
            end = turn.end
            if end is not None and end.completion_tokens is not None:
                reply_tokens = end.completion_tokens + MESSAGE_OVERHEAD
            else:
                reply_tokens = self.count(reply, calls)
            user = turn.user
            if user is not None and end is not None and end.prompt_tokens:
                others = turn.prompt_tokens - user.tokens
                if end.prompt_tokens - others > 0:
                    user.tokens = end.prompt_tokens - others
            del self.entries[: turn.dropped]
            assistant = Entry(
                "assistant", reply, reply_tokens, outcome, turn.response_id, tool_calls=calls
            )
            self.entries += [user, assistant] if user is not None else [assistant]
            if calls:
                self.telemetry.tool_calls("called", len(calls))
        self.turns += 1
        self.tokens_generated += stats.tokens_generated
        self.telemetry.turn_finished(
            OUTCOME_LABELS[outcome],
            tokens=stats.tokens_generated,
            prompt_tokens=turn.end.prompt_tokens if turn.end else None,
            cached_tokens=turn.end.prompt_cached_tokens if turn.end else None,
            trimmed=stats.history_trimmed_turns if outcome == "complete" else 0,
            duration_s=stats.processing_time_ms / 1000,
            ttft_s=None
            if stats.time_to_first_token_ms is None
            else stats.time_to_first_token_ms / 1000,
            ttfc_s=None
            if stats.time_to_first_chunk_ms is None
            else stats.time_to_first_chunk_ms / 1000,
        )

    def truncate(self, response_id: str, heard_chars: int) -> int:
        """`truncate`: the latest reply, once it has ended, becomes its first `heard_chars`
        code points, marked interrupted and counted again; returns the characters kept."""
        if self.current is not None:
            raise InvalidMessage(
                "a reply is still streaming: only the latest reply, once it has ended, "
                "can be truncated (send cancel first)"
            )
        latest = self.entries[-1] if self.entries else None
        if latest is None or latest.response_id != response_id:
            raise InvalidMessage(
                f"response_id {response_id[:MAX_RESPONSE_ID]!r} is not the latest reply; "
                "only the latest reply can be truncated"
            )
        if heard_chars >= len(latest.content):
            return len(latest.content)  # all of it was heard: nothing to cut
        latest.content = latest.content[:heard_chars]
        latest.status = "interrupted"
        latest.tokens = self.count(latest.content, latest.tool_calls)
        return heard_chars

    def messages(self) -> list[Entry]:
        """The whole history: the system prompt, then the turns, then the turn in flight
        (its user message, and its reply as far as it was sent, marked `streaming`)."""
        history = ([self.system] if self.system else []) + self.entries
        turn = self.current
        if turn is not None:
            reply = Entry("assistant", "".join(turn.parts), 0, "streaming", turn.response_id)
            history += [turn.user, reply] if turn.user is not None else [reply]
        return history

    def summary(self) -> SessionSummary:
        return SessionSummary(
            turns=self.turns,
            tokens_generated=self.tokens_generated,
            history_messages=len(self.entries) + (1 if self.system else 0),
            duration_s=round(time.monotonic() - self.started_at, 3),
        )


def new_session_id() -> str:
    return str(uuid.uuid4())


def new_response_id() -> str:
    return f"resp_{uuid.uuid4().hex}"
