"""The engine: one thread that owns every loaded model and steps them; an asyncio face.

MLX work runs only on the engine thread. The event loop talks to it through a command
queue, and gets results back through futures and per-request streams.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import random
import threading
import traceback
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from .coordinator import Coordinator, lost_a_rank
from .detokenizer import TextStream
from .distributed import Cluster
from .errors import (
    ContextLengthError,
    EngineUnavailableError,
    ModelBusyError,
    QueueFullError,
)
from .kv_cache import KVCacheOptions
from .sampling import SamplingParams
from .sequence import RequestOutput, Sequence
from .worker import ModelWorker, ServedModel

log = logging.getLogger(__name__)

IDLE_WAIT_S = 0.2


@dataclass(frozen=True, slots=True)
class EngineSettings:
    max_batch_size: int = 8
    prefill_step_size: int = 512
    queue_size: int = 64
    max_loaded_models: int = 1
    max_sequence_length: int = 4096
    kv_options: KVCacheOptions = KVCacheOptions()
    step_timeout_s: float = 30.0
    exit_grace_s: float = 3.0
    kv_budget_kind: str = "auto"
    kv_budget_value: int = 0
    reserved_memory_mb: int = 2048
    block_size: int = 16
    prefix_cache: bool = True
    disk_dir: str | None = None
    disk_max_bytes: int = 10 * 2**30
    disk_write: str = "evicted"


class RequestStream:
    """The outputs of one request, handed from the engine thread to the event loop."""

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self.request_id = request_id
        self._loop = loop
        self._queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self.finished = False

    def put(self, output: RequestOutput) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, output)

    async def get(self) -> RequestOutput:
        """The next output (safe to cancel: nothing is lost)."""
        output = await self._queue.get()
        self.finished = output.finish_reason is not None
        return output

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        while not self.finished:
            yield await self.get()


def _resolve(future: asyncio.Future, value: Any = None, error: BaseException | None = None) -> None:
    def settle() -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)

    future.get_loop().call_soon_threadsafe(settle)


class Engine:
    """Serves any number of registry models, at most ``max_loaded_models`` loaded at once.

    A request for a model that is not loaded loads it, unloading the least recently used
    idle model if there is no room; a model with running sequences is never unloaded, so
    switching never loses a running request's tokens.
    """

    def __init__(
        self,
        load_model: Callable[[str], ServedModel],
        settings: EngineSettings,
        cluster: Cluster | None = None,
    ) -> None:
        self.load_model = load_model
        self.settings = settings
        self.cluster = cluster or Cluster()
        self.ranks = Coordinator(self.cluster, settings.step_timeout_s, self._fail_group)
        self.observers: list[Callable[[Sequence, RequestOutput], None]] = []
        self.workers: OrderedDict[str, ModelWorker] = OrderedDict()
        self.streams: dict[str, RequestStream] = {}
        self.waiting_for_model: dict[str, list[asyncio.Future | Sequence]] = {}
        self.commands: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self.error: str | None = None
        self._in_flight = 0
        self._waiting = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="mlxserve-engine", daemon=True)
        self._stopping = False
        self._stopped = threading.Event()

    # ---- the event loop's side -----------------------------------------------------------

    def start(self) -> None:
        self._thread.start()
        self.ranks.start()

    def stop(self, timeout: float = 30) -> None:
        self._stopping = True
        self.commands.put(("stop", None))
        if self._thread.is_alive():
            self._stopped.wait(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopped.is_set() and self.error is None

    def loaded_models(self) -> list[str]:
        return list(self.workers)

    def placements(self) -> dict[str, Any]:
        """Each loaded model's share among the ranks (when it has one)."""
        shares = {n: getattr(w.model, "placement", None) for n, w in self.workers.items()}
        return {name: share for name, share in shares.items() if share is not None}

    async def model(self, name: str) -> ServedModel:
        """The loaded model ``name``, loading it (on the engine thread) first if needed."""
        worker = self.workers.get(name)
        if worker is not None:
            return worker.model
        return await self._call("load", name)

    async def unload(self, name: str) -> bool:
        """Unload an idle model; False if it was not loaded. Raises ModelBusyError if busy."""
        return await self._call("unload", name)

    def submit(
        self,
        model: ServedModel,
        prompt_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
    ) -> RequestStream:
        """Queue a request; its stream yields outputs until one has a finish_reason.

        Raises:
            ContextLengthError: the prompt (and max_tokens) cannot fit the context.
            QueueFullError: ``queue_size`` requests are already waiting.
            EngineUnavailableError: the engine has failed or is stopping.
        """
        self._check_alive()
        limit = min(self.settings.max_sequence_length, model.context_length)
        worker = self.workers.get(model.name)
        if worker is not None and worker.capacity_tokens < limit:
            limit = worker.capacity_tokens
        wanted = len(prompt_ids) + (params.max_tokens or 1)
        if not prompt_ids or wanted > limit:
            raise ContextLengthError(
                f"this model's context is {limit} tokens, but the prompt has "
                f"{len(prompt_ids)} tokens"
                + (
                    f" and max_tokens asks for {params.max_tokens} more"
                    if params.max_tokens
                    else ""
                )
                + (" (an empty prompt is not allowed)" if not prompt_ids else "")
            )
        with self._lock:
            if self.queue_depth() >= self.settings.queue_size:
                raise QueueFullError(
                    f"{self.queue_depth()} requests are already waiting (queue_size "
                    f"{self.settings.queue_size}); retry later"
                )
            self._in_flight += 1
        request_id = request_id or uuid.uuid4().hex
        stream = RequestStream(request_id, asyncio.get_running_loop())
        eos = frozenset(getattr(model.tokenizer, "eos_token_ids", ()) or ())
        seq = Sequence(
            request_id=request_id,
            model=model.name,
            prompt_ids=list(prompt_ids),
            params=params,
            max_tokens=min(params.max_tokens or limit, limit - len(prompt_ids)),
            eos_ids=eos,
            seed=params.seed if params.seed is not None else random.getrandbits(62),
            text=TextStream(model.tokenizer, params.stop),
            stream=stream,
        )
        self.streams[request_id] = stream
        self.commands.put(("submit", (model.name, seq)))
        return stream

    def abort(self, request_id: str) -> None:
        """End a request at the next step (e.g. its client went away); its KV is freed."""
        if request_id in self.streams:
            self.commands.put(("abort", request_id))

    def queue_depth(self) -> int:
        """Requests submitted and not yet in a batch."""
        return self._in_flight + self._waiting

    def _check_alive(self) -> None:
        if self.error is not None:
            raise EngineUnavailableError(f"the engine has failed: {self.error}")
        if self._stopping or not self.alive:
            raise EngineUnavailableError("the engine is not running")

    async def _call(self, command: str, name: str) -> Any:
        self._check_alive()
        future = asyncio.get_running_loop().create_future()
        self.commands.put((command, (name, future)))
        return await future

    # ---- the engine thread ---------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping:
                idle = not self._has_work()
                if not self._handle_commands(block=idle) and idle:
                    # MLX's ring backend spins while it waits in a collective: idle followers
                    # sleep instead, waking just before rank 0 may call on them again.
                    self.ranks.tell("idle", sleep=IDLE_WAIT_S * 0.9)
                for name, worker in list(self.workers.items()):
                    if worker.scheduler.has_work():
                        self._step(name, worker)
                self._serve_waiting_models()
                self._count_waiting()
        except Exception as exc:  # a bug in the loop itself: fail loudly, never hang
            self.error = self.error or f"{type(exc).__name__}: {exc}"
            log.critical("engine thread failed:\n%s", traceback.format_exc())
        finally:
            reason = self.error or "the engine stopped"
            for stream in list(self.streams.values()):
                stream.put(RequestOutput(stream.request_id, finish_reason="error", error=reason))
            self.streams.clear()
            self._stopped.set()
        # A thread that ran MLX work and exits can abort the process when it ends
        # ("terminate called without an active exception"); park it until the process ends.
        threading.Event().wait()

    def _count_waiting(self) -> None:
        waiting = sum(len(w.scheduler.waiting) for w in self.workers.values())
        waiting += sum(
            isinstance(item, Sequence)
            for items in self.waiting_for_model.values()
            for item in items
        )
        with self._lock:
            self._waiting = waiting

    def _has_work(self) -> bool:
        return any(w.scheduler.has_work() for w in self.workers.values())

    def _handle_commands(self, block: bool) -> bool:
        """Carry out the queued commands (waiting a while for one if ``block``); any?"""
        handled = False
        while True:
            try:
                command, arg = self.commands.get(block=block, timeout=IDLE_WAIT_S)
            except queue.Empty:
                return handled
            block, handled = False, True
            getattr(self, f"_on_{command}")(arg)

    def _on_stop(self, _: None) -> None:
        self._stopping = True
        self.ranks.tell("stop")

    def _on_submit(self, arg: tuple[str, Sequence]) -> None:
        name, seq = arg
        with self._lock:
            self._in_flight -= 1
            self._waiting += 1
        worker = self.workers.get(name)
        if worker is None:
            self.waiting_for_model.setdefault(name, []).append(seq)
        else:
            self.workers.move_to_end(name)
            worker.scheduler.add(seq)

    def _on_abort(self, request_id: str) -> None:
        for worker in self.workers.values():
            seq = worker.scheduler.find(request_id)
            if seq is not None:
                worker.scheduler.finish(seq, "abort")
                self._publish(
                    seq, RequestOutput(request_id, finish_reason="abort", usage=seq.usage())
                )
                return
        for pending in self.waiting_for_model.values():
            for item in pending:
                if isinstance(item, Sequence) and item.request_id == request_id:
                    pending.remove(item)
                    self._publish(item, RequestOutput(request_id, finish_reason="abort"))
                    return

    def _on_load(self, arg: tuple[str, asyncio.Future]) -> None:
        name, future = arg
        if name in self.workers:
            self.workers.move_to_end(name)
            _resolve(future, self.workers[name].model)
        else:
            self.waiting_for_model.setdefault(name, []).append(future)

    def _on_unload(self, arg: tuple[str, asyncio.Future]) -> None:
        name, future = arg
        worker = self.workers.get(name)
        if worker is None:
            _resolve(future, False)
        elif worker.scheduler.num_active:
            _resolve(
                future,
                error=ModelBusyError(
                    f"model {name!r} has {worker.scheduler.num_active} requests running"
                ),
            )
        else:
            self._unload(name)
            _resolve(future, True)

    def _unload(self, name: str) -> None:
        worker = self.workers.pop(name)
        self.ranks.tell("unload", model=name)
        for seq in worker.scheduler.drain():  # only waiting ones: it was idle
            self.waiting_for_model.setdefault(name, []).append(seq)
        log.info("unloaded model %s", name)

    def _serve_waiting_models(self) -> None:
        for name in list(self.waiting_for_model):
            if name not in self.workers and not self._make_room():
                for worker in self.workers.values():  # let busy models drain, then switch
                    worker.scheduler.admitting = False
                return
            self._load(name)
        for worker in self.workers.values():
            worker.scheduler.admitting = True

    def _make_room(self) -> bool:
        if len(self.workers) < self.settings.max_loaded_models:
            return True
        for name, worker in self.workers.items():  # least recently used first
            if worker.scheduler.num_active == 0:
                self._unload(name)
                return True
        return False

    def _load(self, name: str) -> None:
        pending = self.waiting_for_model.pop(name)
        try:
            if name not in self.workers:
                log.info("loading model %s", name)
                model = self.ranks.load(name, self.load_model)
                distributed = self.ranks.distributed
                announce = self.ranks.announcer(name)
                placement = getattr(model, "placement", None)
                can_measure = not distributed or placement.strategy == "pipeline"
                self.workers[name] = ModelWorker(
                    model, self.settings, announce, can_measure, can_use_disk=not distributed
                )
        except Exception as exc:
            log.error("loading model %s failed: %s", name, exc)
            for item in pending:
                if isinstance(item, Sequence):
                    self._publish(
                        item, RequestOutput(item.request_id, finish_reason="error", error=str(exc))
                    )
                else:
                    _resolve(item, error=exc)
            return
        worker = self.workers[name]
        for item in pending:
            if isinstance(item, Sequence):
                worker.scheduler.add(item)
            else:
                _resolve(item, worker.model)

    def _step(self, name: str, worker: ModelWorker) -> None:
        try:
            results = self.ranks.together(worker.step)
        except Exception as exc:
            if lost_a_rank(exc):
                raise
            log.error("step of model %s failed:\n%s", name, traceback.format_exc())
            error = f"{type(exc).__name__}: {exc}"
            for seq in worker.fail():
                self._publish(
                    seq, RequestOutput(seq.request_id, finish_reason="error", error=error)
                )
            self.ranks.tell("reset", model=name)
            return
        for seq, output in results:
            self._publish(seq, output)

    def _publish(self, seq: Sequence, output: RequestOutput) -> None:
        for observe in self.observers:
            observe(seq, output)
        seq.stream.put(output)
        if output.finish_reason is not None:
            self.streams.pop(seq.request_id, None)

    def _fail_group(self, reason: str) -> None:
        """A rank is gone: end every request, say so, and exit so a supervisor can restart."""
        if self.error is not None:
            return
        self.error = reason
        log.critical("%s; exiting in %g s", reason, self.settings.exit_grace_s)
        for stream in list(self.streams.values()):
            stream.put(RequestOutput(stream.request_id, finish_reason="error", error=reason))
        self.streams.clear()
        threading.Timer(self.settings.exit_grace_s, os._exit, (1,)).start()
