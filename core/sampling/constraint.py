"""Grammar-constrained decoding: each sequence's grammar decides which tokens it may sample.

Grammars are llguidance Lark text (``start: %json{...}`` embeds a JSON Schema), so grammars
from different places compose. The masks of a batch's constrained rows are computed at once
by llguidance's own threads, which release the GIL: the worker starts them while the forward
pass runs and joins them before sampling.

Grammars are compiled on a few threads of their own (:func:`compile_constraint`), each with a
large stack: llguidance compiles JSON Schemas recursively, and a deep one overflows an
ordinary thread's stack, which ends the whole process. The schemas are bounded before that
(:mod:`mlxserve.core.sampling.grammar_limits`); the large stack is the second line. A compile has a
time limit; one past it is abandoned to its thread (native code cannot be stopped), and at
most ``MAX_STUCK_COMPILES`` such threads are replaced, so a few slow grammars cannot take
every compile thread.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import re
import threading
import time
import weakref
from collections.abc import Callable
from collections.abc import Sequence as Seq
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import llguidance
import llguidance.hf
import mlx.core as mx
import numpy as np
from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask_par

from mlxserve.core.errors import QueueFullError
from mlxserve.core.sampling.grammar_limits import (
    COMPILE_QUEUE_WAIT_S,
    COMPILE_STACK_BYTES,
    COMPILE_THREADS,
    COMPILE_TIMEOUT_S,
    MAX_STUCK_COMPILES,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

# Compact JSON with json.dumps' separators: no free whitespace a model could repeat forever.
JSON_FORMAT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

_tokenizers: weakref.WeakKeyDictionary[Any, llguidance.LLTokenizer] = weakref.WeakKeyDictionary()
_tokenizers_lock = threading.Lock()
_executor: llguidance.LLExecutor | None = None
_executor_lock = threading.Lock()
_background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlxserve-masks")


class GrammarError(ValueError):
    """A grammar (or JSON Schema) cannot be compiled, or a token breaks it."""


class GrammarTimeoutError(GrammarError):
    """A grammar took longer than ``COMPILE_TIMEOUT_S`` to compile."""


def _first_line(message: str) -> str:
    line = message.strip().splitlines()[0] if message.strip() else "unknown grammar error"
    return re.sub(r"^at \d+\(\d+\): ", "", line)


def _limits() -> llguidance.LLParserLimits:
    # llguidance's own limits at their defaults, but errors without its parser state dumps
    return llguidance.LLParserLimits(verbose_errors=False)


def grammar_tokenizer(tokenizer: Any, vocab_size: int) -> llguidance.LLTokenizer:
    """The llguidance view of a model's tokenizer (built once per tokenizer object).

    Args:
        tokenizer: mlx-lm's TokenizerWrapper (its ``_tokenizer`` is a fast HF tokenizer).
        vocab_size: the model's logits width; ids past the tokenizer's own are never allowed.

    Raises:
        GrammarError: the tokenizer is not one llguidance can read (not a fast tokenizer).
    """
    with _tokenizers_lock:
        found = _tokenizers.get(tokenizer)
        if found is None or found.vocab_size != vocab_size:
            hf = getattr(tokenizer, "_tokenizer", tokenizer)
            eos = sorted(getattr(tokenizer, "eos_token_ids", None) or [hf.eos_token_id])
            try:
                found = llguidance.hf.from_tokenizer(hf, n_vocab=vocab_size, eos_token=eos)
            except Exception as exc:
                message = f"this model's tokenizer cannot constrain output: {exc}"
                raise GrammarError(message) from exc
            _tokenizers[tokenizer] = found
        return found


def json_grammar(schema: dict[str, Any] | None) -> str:
    """The Lark grammar of one JSON value conforming to ``schema`` (None: any JSON object).

    The output is compact (``", "`` and ``": "`` separators, no other whitespace) unless the
    schema's own ``x-guidance`` options say otherwise.
    """
    schema = {"type": "object"} if schema is None else dict(schema)
    options = schema.get("x-guidance", {})
    if not isinstance(options, dict):
        raise GrammarError("x-guidance must be an object (of llguidance's JSON options)")
    schema["x-guidance"] = JSON_FORMAT | options
    return "start: %json" + json.dumps(schema, ensure_ascii=False)


class Constraint:
    """One sequence's grammar and how far its output has come through it.

    Raises:
        GrammarError: the grammar does not compile; the message names the problem.
    """

    def __init__(self, ll_tokenizer: llguidance.LLTokenizer, grammar: str) -> None:
        self.vocab_size = ll_tokenizer.vocab_size
        self.matcher = llguidance.LLMatcher(ll_tokenizer, grammar, log_level=0, limits=_limits())
        if self.matcher.is_error():
            raise GrammarError(_first_line(self.matcher.get_error()))

    def consume(self, token: int) -> None:
        """Advance past a sampled token; GrammarError if the grammar does not allow it (or
        cannot go on: llguidance's limits on a step's work)."""
        if not self.matcher.consume_token(token):
            message = _first_line(self.matcher.get_error())
            raise GrammarError(f"the output cannot go on under its grammar: {message}")

    def allowed_prefix(self, tokens: Seq[int]) -> int:
        """How many of ``tokens``, from the first, the grammar would take (none consumed)."""
        return int(self.matcher.validate_tokens(list(tokens))) if tokens else 0

    def forced(self) -> list[int]:
        """The tokens the grammar allows alone from here on (none consumed)."""
        return [int(t) for t in self.matcher.compute_ff_tokens()]

    @property
    def done(self) -> bool:
        """The grammar is complete: only end-of-sequence could follow."""
        return self.matcher.is_stopped()

    @property
    def is_error(self) -> bool:
        return self.matcher.is_error()


class _Job:
    def __init__(self, work: Callable[[], Any]) -> None:
        self.work = work
        self.future: Future[Any] = Future()
        self.started: float | None = None  # time.monotonic() when a thread took it
        self.finished = False
        self.abandoned = False  # past its time limit: its thread was replaced


class CompilePool:
    """A few threads with a large stack that compile grammars, each compile with a time limit.

    A compile past its limit cannot be stopped (it is native code); its thread is replaced
    while at most ``max_stuck`` are, and rejoins (or ends) when the compile returns. A
    request waiting longer than ``queue_wait_s`` for a thread is refused (QueueFullError).
    """

    def __init__(
        self,
        threads: int = COMPILE_THREADS,
        stack_bytes: int = COMPILE_STACK_BYTES,
        timeout_s: float = COMPILE_TIMEOUT_S,
        queue_wait_s: float = COMPILE_QUEUE_WAIT_S,
        max_stuck: int = MAX_STUCK_COMPILES,
    ) -> None:
        self.threads = threads
        self.stack_bytes = stack_bytes
        self.timeout_s = timeout_s
        self.queue_wait_s = queue_wait_s
        self.max_stuck = max_stuck
        self.healthy = 0  # threads not held by an abandoned compile
        self.stuck = 0  # threads held by one
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._started = False

    def _start_thread(self) -> None:  # with self._lock held
        thread = threading.Thread(target=self._serve, name="mlxserve-grammar", daemon=True)
        with _stack_size_lock:  # the size is the process's: set only around this start
            try:
                previous = threading.stack_size(self.stack_bytes)
            except (ValueError, RuntimeError) as exc:  # a platform that cannot: the limits hold
                log.warning("grammar compile threads keep the default stack: %s", exc)
                previous = None
            try:
                thread.start()
            finally:
                if previous is not None:
                    threading.stack_size(previous)
        self.healthy += 1

    def _serve(self) -> None:
        while True:
            job = self._jobs.get()
            if not job.future.set_running_or_notify_cancel():
                continue  # its request went away while it waited
            job.started = time.monotonic()
            try:
                result = job.work()
            except BaseException as exc:  # noqa: BLE001 - the request's to report
                job.future.set_exception(exc)
            else:
                job.future.set_result(result)
            with self._lock:
                job.finished = True
                if job.abandoned:
                    self.stuck -= 1
                    log.warning(
                        "a grammar compile that passed its time limit ended after %.1f s",
                        time.monotonic() - job.started,
                    )
                    if self.healthy >= self.threads:
                        return  # replaced while it was stuck
                    self.healthy += 1

    async def run(self, work: Callable[[], T]) -> T:
        """``work()`` on a compile thread; its result or exception.

        Raises:
            GrammarTimeoutError: it ran longer than ``timeout_s`` (it goes on, abandoned).
            QueueFullError: no compile thread was free within ``queue_wait_s``.
        """
        job = _Job(work)
        with self._lock:
            if not self._started:
                self._started = True
                for _ in range(self.threads):
                    self._start_thread()
        self._jobs.put(job)
        waiting = asyncio.wrap_future(job.future)
        queued_until = time.monotonic() + self.queue_wait_s
        try:
            while True:
                now = time.monotonic()
                if job.started is None:
                    left = queued_until - now
                    if left <= 0 and job.future.cancel():
                        raise QueueFullError(
                            "every grammar compile thread is busy (slow grammars of other "
                            "requests); try again later"
                        )
                else:
                    left = job.started + self.timeout_s - now
                    if left <= 0 and self._abandon(job):
                        raise GrammarTimeoutError(
                            f"compiling it took longer than {self.timeout_s:g} s (the limit)"
                        )
                await asyncio.wait({waiting}, timeout=min(max(left, 0.0), 0.25))
                if waiting.done():
                    return waiting.result()
        except asyncio.CancelledError:
            job.future.cancel()  # no-op once it runs: its thread finishes and drops it
            raise

    def _abandon(self, job: _Job) -> bool:
        """Give a compile past its time limit up; False if it has just finished."""
        with self._lock:
            if job.finished:
                return False
            job.abandoned = True
            self.healthy -= 1
            self.stuck += 1
            log.warning(
                "a grammar compile passed its time limit (%g s); %d such compile(s) running",
                self.timeout_s,
                self.stuck,
            )
            if self.stuck <= self.max_stuck:
                self._start_thread()
            return True


_stack_size_lock = threading.Lock()
_compile_pool: CompilePool | None = None
_compile_pool_lock = threading.Lock()


def compile_pool() -> CompilePool:
    """The process's grammar compile threads (started on first use)."""
    global _compile_pool
    with _compile_pool_lock:
        if _compile_pool is None:
            _compile_pool = CompilePool()
        return _compile_pool


async def compile_constraint(tokenizer: Any, vocab_size: int, grammar: str) -> Constraint:
    """Compile ``grammar`` for a model (its tokenizer and logits width) on the compile
    threads, never on the event loop or an ordinary thread.

    Raises:
        GrammarError: it does not compile (GrammarTimeoutError: not in time).
        QueueFullError: every compile thread stayed busy.
    """
    return await compile_pool().run(
        lambda: Constraint(grammar_tokenizer(tokenizer, vocab_size), grammar)
    )


def _shared_executor() -> llguidance.LLExecutor:
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = llguidance.LLExecutor()
        return _executor


def compute_masks(constraints: Seq[Constraint | None]) -> np.ndarray | None:
    """The allowed-token bitmask of every row (all ones for unconstrained rows), or None if
    no row is constrained. All rows are computed at once by llguidance's threads."""
    rows = [(c.matcher, i) for i, c in enumerate(constraints) if c is not None]
    if not rows:
        return None
    vocab = next(c.vocab_size for c in constraints if c is not None)
    bitmask = allocate_token_bitmask(len(constraints), vocab)
    fill_next_token_bitmask_par(_shared_executor(), rows, bitmask)
    return bitmask


def start_masks(constraints: Seq[Constraint | None]) -> Future[np.ndarray | None] | None:
    """Begin :func:`compute_masks` in the background (None if no row is constrained).

    The constraints must not be consumed until the result has been taken.
    """
    if all(c is None for c in constraints):
        return None
    return _background.submit(compute_masks, list(constraints))


def join_masks(pending: Future[np.ndarray | None] | None) -> np.ndarray | None:
    """The result of :func:`start_masks`; None if it failed, so that sampling computes the
    masks again row by row and a failing grammar ends its own sequence alone."""
    if pending is None:
        return None
    try:
        return pending.result()
    except Exception:
        return None


def mask_logits(
    logits: mx.array, constraints: Seq[Constraint | None], masks: np.ndarray | None = None
) -> mx.array:
    """``logits`` [B, V] with every token a row's grammar rules out set to -inf.

    Args:
        logits: one row per sequence.
        constraints: each row's constraint, None for an unconstrained row.
        masks: the rows' bitmasks from :func:`compute_masks` if already computed.

    Raises:
        GrammarError: a row's grammar is in error or allows no token at all.
    """
    constrained = [i for i, c in enumerate(constraints) if c is not None]
    if not constrained:
        return logits
    for constraint in constraints:
        if constraint is not None and constraint.is_error:
            raise GrammarError(_first_line(constraint.matcher.get_error()))
    if masks is None:
        masks = compute_masks(constraints)
    assert masks is not None
    batch, vocab = logits.shape
    bits = np.unpackbits(masks.view(np.uint8), axis=1, bitorder="little")[:, :vocab]
    allowed = np.ones((batch, vocab), dtype=np.bool_)
    allowed[constrained, :] = False
    allowed[:, : bits.shape[1]] = bits.astype(np.bool_)
    if not allowed[constrained].any(axis=1).all():
        raise GrammarError("the grammar allows no token here")
    return mx.where(mx.array(allowed), logits, -mx.inf)
