"""Grammar-constrained decoding: each sequence's grammar decides which tokens it may sample.

Grammars are llguidance Lark text (``start: %json{...}`` embeds a JSON Schema), so grammars
from different places compose. The masks of a batch's constrained rows are computed at once
by llguidance's own threads, which release the GIL: the worker starts them while the forward
pass runs and joins them before sampling.
"""

from __future__ import annotations

import json
import re
import threading
import weakref
from collections.abc import Sequence as Seq
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import llguidance
import llguidance.hf
import mlx.core as mx
import numpy as np
from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask_par

# Compact JSON with json.dumps' separators: no free whitespace a model could repeat forever.
JSON_FORMAT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

_tokenizers: weakref.WeakKeyDictionary[Any, llguidance.LLTokenizer] = weakref.WeakKeyDictionary()
_tokenizers_lock = threading.Lock()
_executor: llguidance.LLExecutor | None = None
_executor_lock = threading.Lock()
_background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlxserve-masks")


class GrammarError(ValueError):
    """A grammar (or JSON Schema) cannot be compiled, or a token breaks it."""


def _first_line(message: str) -> str:
    line = message.strip().splitlines()[0] if message.strip() else "unknown grammar error"
    return re.sub(r"^at \d+\(\d+\): ", "", line)


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
    schema["x-guidance"] = JSON_FORMAT | schema.get("x-guidance", {})
    return "start: %json" + json.dumps(schema, ensure_ascii=False)


class Constraint:
    """One sequence's grammar and how far its output has come through it.

    Raises:
        GrammarError: the grammar does not compile; the message names the problem.
    """

    def __init__(self, ll_tokenizer: llguidance.LLTokenizer, grammar: str) -> None:
        self.vocab_size = ll_tokenizer.vocab_size
        self.matcher = llguidance.LLMatcher(ll_tokenizer, grammar, log_level=0)
        if self.matcher.is_error():
            raise GrammarError(_first_line(self.matcher.get_error()))

    def consume(self, token: int) -> None:
        """Advance past a sampled token; GrammarError if the grammar does not allow it."""
        if not self.matcher.consume_token(token):
            message = _first_line(self.matcher.get_error())
            raise GrammarError(f"token {token} does not fit the grammar: {message}")

    @property
    def done(self) -> bool:
        """The grammar is complete: only end-of-sequence could follow."""
        return self.matcher.is_stopped()

    @property
    def is_error(self) -> bool:
        return self.matcher.is_error()


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
