"""Prompts are tokenized off the event loop, on a few threads that each own a copy of the
model's tokenizer: a Hugging Face tokenizer must not be used from two threads at once, and
with one shared copy behind a lock, one long prompt made every other request wait."""

from __future__ import annotations

import asyncio
import copy
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

# At most this many prompts are tokenized at once; the others wait for a thread.
TOKENIZER_THREADS = 4

_pool = ThreadPoolExecutor(TOKENIZER_THREADS, thread_name_prefix="mlxserve-tokenize")
_local = threading.local()


def own_copy(tokenizer: Any) -> Any:
    """This thread's copy of ``tokenizer`` (made on first use, dropped with the model)."""
    copies: weakref.WeakKeyDictionary[Any, Any] | None = getattr(_local, "copies", None)
    if copies is None:
        copies = _local.copies = weakref.WeakKeyDictionary()
    try:
        found = copies.get(tokenizer)
    except TypeError:  # not weak-referenceable: a fresh copy each time, never shared
        return copy.deepcopy(tokenizer)
    if found is None:
        found = copies[tokenizer] = copy.deepcopy(tokenizer)
    return found


async def with_own_tokenizer(tokenizer: Any, work: Callable[[Any], T]) -> T:
    """``work(copy)`` on a tokenizing thread, with that thread's copy of ``tokenizer``."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_pool, lambda: work(own_copy(tokenizer)))
