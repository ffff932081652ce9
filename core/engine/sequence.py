"""One request's state as it moves through the engine, and what it hands back."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from mlxserve.core.engine.detokenizer import TextStream
from mlxserve.core.sampling.params import SamplingParams
from mlxserve.core.sampling.thinking import Thinking


class Status(Enum):
    WAITING = "waiting"
    PREFILLING = "prefilling"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    ttft_s: float | None = None
    decode_s: float | None = None
    reasoning_tokens: int = 0  # of completion_tokens, those of a thinking block (end marker too)
    draft_tokens: int = 0  # tokens drafted for it (speculative decoding)
    accepted_tokens: int = 0  # of those, the ones verification accepted


@dataclass(frozen=True, slots=True)
class RequestOutput:
    """What one engine step produced for one request: new text, and whether it is done.

    ``finish_reason`` is "stop", "length", "abort" or "error" on the last output
    (``error`` then says what went wrong; ``error_kind`` "grammar" if the request's own
    grammar could not go on), None before; ``stop_sequence`` is the stop string that ended
    it, if one did. ``prompt_logprobs``, on the first output of a request that asked for
    them, scores the prompt's tokens from the second on.
    """

    request_id: str
    text: str = ""
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: str | None = None
    error: str | None = None
    usage: Usage | None = None
    stop_sequence: str | None = None
    error_kind: str | None = None
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None


@dataclass(eq=False)
class Sequence:
    request_id: str
    model: str
    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int
    eos_ids: frozenset[int]
    seed: int
    text: TextStream
    output_ids: list[int] = field(default_factory=list)
    num_prefilled: int = 0
    cached_tokens: int = 0
    status: Status = Status.WAITING
    finish_reason: str | None = None
    arrival_time: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    token_counts: dict[int, int] = field(default_factory=dict)
    stream: Any = None
    reused: tuple[str, ...] = ()
    snapshot: tuple[int, str] | None = None  # where its recurrent state is copied (see Scheduler)
    reservation: Any = None
    constraint: Any = None  # a core.constraint.Constraint: the grammar its output must follow
    thinking: Thinking | None = None  # its open thinking block (a budget, a waiting grammar)
    lane: int = 0  # its micro-batch (see Scheduler)
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # scored so far
    draft: tuple[int, ...] = ()  # tokens drafted to follow its last, verified in the next step
    drafted: int = 0
    accepted: int = 0

    @property
    def scores_prompt(self) -> bool:
        return self.params.prompt_logprobs is not None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def prompt_remaining(self) -> int:
        return len(self.prompt_ids) - self.num_prefilled

    @property
    def last_token(self) -> int:
        return self.output_ids[-1]

    def append(self, token: int) -> None:
        if self.first_token_time is None:
            self.first_token_time = time.perf_counter()
        self.output_ids.append(token)
        self.token_counts[token] = self.token_counts.get(token, 0) + 1

    def usage(self) -> Usage:
        now = time.perf_counter()
        first = self.first_token_time
        return Usage(
            prompt_tokens=len(self.prompt_ids),
            completion_tokens=len(self.output_ids),
            cached_tokens=self.cached_tokens,
            ttft_s=None if first is None else first - self.arrival_time,
            decode_s=None if first is None else now - first,
            reasoning_tokens=self.thinking.tokens if self.thinking is not None else 0,
            draft_tokens=self.drafted,
            accepted_tokens=self.accepted,
        )
