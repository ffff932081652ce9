"""The engine: one thread that owns every loaded model and steps them; an asyncio face.

MLX work runs only on the engine thread. The event loop talks to it through a command
queue, and gets results back through futures and per-request streams.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import queue
import random
import threading
import traceback
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from mlxserve.core.distributed.cluster import Cluster
from mlxserve.core.distributed.ranks import RankZero, lost_a_rank
from mlxserve.core.engine.detokenizer import TextStream
from mlxserve.core.engine.sequence import RequestOutput, Sequence
from mlxserve.core.engine.settings import EngineSettings, sequence_limit
from mlxserve.core.engine.worker import ModelWorker, ServedModel
from mlxserve.core.errors import (
    ContextLengthError,
    EngineUnavailableError,
    ModelBusyError,
    QueueFullError,
)
from mlxserve.core.sampling.constraint import Constraint
from mlxserve.core.sampling.params import SamplingParams
from mlxserve.core.sampling.thinking import Thinking

log = logging.getLogger(__name__)
T = TypeVar("T")

IDLE_WAIT_S = 0.2
SHUTDOWN_MESSAGE = "the server is shutting down"


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


class QueueSlot:
    """A request's place in the engine's queue while it is prepared (see Engine.reserve)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self.taken = False
        self._released = False

    def release(self) -> None:
        """Give the place back (the request was refused or failed before it was queued)."""
        if not self.taken and not self._released:
            self._released = True
            self._engine._release()


def _resolve(
    future: asyncio.Future[Any], value: Any = None, error: BaseException | None = None
) -> None:
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

    Stopping is graceful: :meth:`drain` refuses new requests and gives the running ones a
    grace period; :meth:`stop` ends whatever is left with an error and keeps the prefix
    cache on the disk tier. A failure of the engine itself (or a lost rank) ends every
    request with an error and exits the process with status 1 after ``exit_grace_s``, so
    a supervisor can restart it.
    """

    def __init__(
        self,
        load_model: Callable[[str], ServedModel],
        settings: EngineSettings,
        cluster: Cluster | None = None,
        load_alone: Callable[[str], ServedModel] | None = None,
    ) -> None:
        self.load_model = load_model
        # Draft models run on this rank alone, whatever the ranks share.
        self.load_alone = load_alone or load_model
        self.settings = settings
        self.cluster = cluster or Cluster()
        self.ranks = RankZero(self.cluster, settings.step_timeout_s, self.fail)
        self.observers: list[Callable[[Sequence, RequestOutput], None]] = []
        self.workers: OrderedDict[str, ModelWorker] = OrderedDict()
        self.streams: dict[str, RequestStream] = {}
        self.seqs_waiting_for_model: dict[str, list[Sequence]] = {}
        self.loads_waiting: dict[str, list[asyncio.Future[ServedModel]]] = {}
        self.commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self.error: str | None = None
        self._in_flight = 0
        self._waiting = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="mlxserve-engine", daemon=True)
        self._draining = False
        self._stopping = False
        self._stopped = threading.Event()
        self._exit_timer: threading.Timer | None = None

    # ---- the event loop's side -----------------------------------------------------------

    def start(self) -> None:
        self._thread.start()
        self.ranks.start()

    def drain(self, grace_s: float) -> None:
        """Refuse new requests from now on; those running get ``grace_s`` seconds to finish,
        then end with an error."""
        if self._draining:
            return
        self._draining = True
        log.info("shutting down: new requests are refused; %g s for running ones", grace_s)
        timer = threading.Timer(grace_s, self._send, (self._end_all, SHUTDOWN_MESSAGE))
        timer.daemon = True
        timer.start()

    def stop(self, timeout: float = 30) -> None:
        """End what is left (with an error), keep the prefix cache on disk, stop the ranks."""
        self._draining = True
        self._send(self._on_stop)
        if self._thread.is_alive():
            self._stopped.wait(timeout)

    @property
    def alive(self) -> bool:
        return (
            self._thread.is_alive()
            and not self._stopped.is_set()
            and self.error is None
            and not self._draining
        )

    @property
    def shutting_down(self) -> bool:
        return self._draining

    def loaded_models(self) -> list[str]:
        return list(self.workers)

    def placements(self) -> dict[str, Any]:
        """Each loaded model's share among the ranks (when it has one)."""
        workers = list(self.workers.items())  # the engine thread may add or drop one meanwhile
        shares = {n: w.model.placement for n, w in workers}
        return {name: share for name, share in shares.items() if share is not None}

    async def model(self, name: str) -> ServedModel:
        """The loaded model ``name``, loading it (on the engine thread) first if needed."""
        worker = self.workers.get(name)
        if worker is not None:
            return worker.model
        return await self._call(self._on_load, name)

    async def unload(self, name: str) -> bool:
        """Unload an idle model; False if it was not loaded. Raises ModelBusyError if busy."""
        return await self._call(self._on_unload, name)

    def submit(
        self,
        model: ServedModel,
        prompt_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        *,
        constraint: Constraint | None = None,
        slot: QueueSlot | None = None,
        thinking: Thinking | None = None,
    ) -> RequestStream:
        """Queue a request; its stream yields outputs until one has a finish_reason.

        ``constraint`` (compiled off the event loop) is the grammar its output must follow.
        ``thinking``: its output opens inside a thinking block (with a budget, or a grammar
        that waits for the block's end).
        ``slot`` is the place in the queue :meth:`reserve` gave it before it was prepared
        (without one, a place is taken now).

        Raises:
            ContextLengthError: the prompt (and max_tokens) cannot fit the context or the
                model's KV budget.
            QueueFullError: ``queue_size`` requests are already waiting.
            EngineUnavailableError: the engine has failed or is stopping.
        """
        slot = slot or self.reserve()
        try:
            self._check_alive()
            self._check_fits(model, prompt_ids, params)
        except BaseException:
            slot.release()
            raise
        slot.taken = True
        return self._queue(model, prompt_ids, params, request_id, constraint, thinking)

    def reserve(self) -> QueueSlot:
        """A place in the queue, taken before a request does any work that grows with its
        size (tokenizing, compiling its grammar); :meth:`submit` uses it, or
        :meth:`QueueSlot.release` gives it back.

        Raises:
            QueueFullError: ``queue_size`` requests are already waiting.
            EngineUnavailableError: the engine has failed or is stopping.
        """
        self._check_alive()
        with self._lock:
            if self.queue_depth() >= self.settings.queue_size:
                raise QueueFullError(
                    f"{self.queue_depth()} requests are already waiting (queue_size "
                    f"{self.settings.queue_size}); retry later"
                )
            self._in_flight += 1
        return QueueSlot(self)

    def _release(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def _check_fits(
        self, model: ServedModel, prompt_ids: list[int], params: SamplingParams
    ) -> None:
        limit = self._longest_sequence(model)
        wanted = len(prompt_ids) + (1 if params.max_tokens is None else params.max_tokens)
        if not prompt_ids or wanted > limit:
            fits = len(prompt_ids) <= limit
            raise ContextLengthError(
                f"this model's context is {limit} tokens, but the prompt has "
                f"{len(prompt_ids)} tokens"
                + (
                    f" and max_tokens asks for {params.max_tokens} more"
                    if params.max_tokens
                    else ""
                )
                + (" (an empty prompt is not allowed)" if not prompt_ids else ""),
                limit=limit if prompt_ids else None,
                prompt_tokens=len(prompt_ids),
                max_tokens=(params.max_tokens or 1) if fits else None,
            )

    def _queue(
        self,
        model: ServedModel,
        prompt_ids: list[int],
        params: SamplingParams,
        request_id: str | None,
        constraint: Constraint | None,
        thinking: Thinking | None = None,
    ) -> RequestStream:
        limit = self._longest_sequence(model)
        request_id = request_id or uuid.uuid4().hex
        stream = RequestStream(request_id, asyncio.get_running_loop())
        seq = Sequence(
            request_id=request_id,
            model=model.name,
            prompt_ids=list(prompt_ids),
            params=params,
            max_tokens=min(
                limit if params.max_tokens is None else params.max_tokens, limit - len(prompt_ids)
            ),
            eos_ids=model.eos_token_ids,
            seed=params.seed if params.seed is not None else random.getrandbits(62),
            text=TextStream(model.tokenizer, params.stop, model.hidden_special_tokens),
            stream=stream,
            constraint=constraint,
            thinking=thinking,
        )
        self.streams[request_id] = stream
        self._send(self._on_submit, model.name, seq)
        return stream

    def abort(self, request_id: str) -> None:
        """End a request at the next step (e.g. its client went away); its KV is freed."""
        if request_id in self.streams:
            self._send(self._on_abort, request_id)

    def queue_depth(self) -> int:
        """Requests submitted and not yet in a batch."""
        return self._in_flight + self._waiting

    def _longest_sequence(self, model: ServedModel) -> int:
        """Prompt plus generated tokens one sequence of ``model`` may have."""
        limit = sequence_limit(
            self.settings.kv_for(model.name).max_sequence_length, model.context_length
        )
        worker = self.workers.get(model.name)
        return limit if worker is None else min(limit, worker.capacity_tokens)

    def _check_alive(self) -> None:
        if self.error is not None:
            raise EngineUnavailableError(f"the engine has failed: {self.error}")
        if self._draining:
            raise EngineUnavailableError(SHUTDOWN_MESSAGE)
        if not self.alive:
            raise EngineUnavailableError("the engine is not running")

    def _send(self, command: Callable[..., None], *args: Any) -> None:
        self.commands.put(functools.partial(command, *args))

    async def _call(self, command: Callable[[str, asyncio.Future[T]], None], name: str) -> T:
        self._check_alive()
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._send(command, name, future)
        return await future

    # ---- the engine thread ---------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping:
                idle = not self._has_work()
                if not self._handle_commands(block=idle) and idle:
                    # MLX's ring backend spins while it waits in a collective: idle followers
                    # sleep instead, waking just before rank 0 may call on them again.
                    self.ranks.idle(IDLE_WAIT_S * 0.9)
                for name, worker in list(self.workers.items()):
                    if worker.has_work():
                        self._step(name, worker)
                self._serve_waiting_models()
                self._count_waiting()
        except Exception as exc:  # a bug in the loop itself: fail loudly, never hang
            log.critical("engine thread failed:\n%s", traceback.format_exc())
            self.fail(f"the engine thread failed: {type(exc).__name__}: {exc}")
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
        waiting += sum(len(seqs) for seqs in self.seqs_waiting_for_model.values())
        with self._lock:
            self._waiting = waiting

    def _has_work(self) -> bool:
        return any(w.has_work() for w in self.workers.values())

    def _handle_commands(self, block: bool) -> bool:
        """Carry out the queued commands (waiting a while for one if ``block``); any?"""
        handled = False
        while True:
            try:
                command = self.commands.get(block=block, timeout=IDLE_WAIT_S)
            except queue.Empty:
                return handled
            block, handled = False, True
            command()

    def _on_stop(self) -> None:
        self._settle()
        self._end_all("the server stopped")
        for name, worker in self.workers.items():
            try:
                worker.close(self.settings.disk_flush_s)
            except Exception:
                log.exception("%s: could not keep its prefix cache", name)
        self.ranks.stop()
        self._stopping = True

    def _on_submit(self, name: str, seq: Sequence) -> None:
        with self._lock:
            self._in_flight -= 1
            self._waiting += 1
        worker = self.workers.get(name)
        if worker is None:
            self.seqs_waiting_for_model.setdefault(name, []).append(seq)
        else:
            self.workers.move_to_end(name)
            self._enqueue(worker, seq)

    def _enqueue(self, worker: ModelWorker, seq: Sequence) -> None:
        needed = len(seq.prompt_ids) + seq.max_tokens
        if needed > worker.capacity_tokens:  # never fits: waiting would block the queue
            error = (
                f"the request needs {needed} tokens of KV cache, but model "
                f"{seq.model!r} has room for {worker.capacity_tokens}"
            )
            self._publish(seq, RequestOutput(seq.request_id, finish_reason="error", error=error))
        else:
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
        for seqs in self.seqs_waiting_for_model.values():
            for seq in seqs:
                if seq.request_id == request_id:
                    seqs.remove(seq)
                    self._publish(seq, RequestOutput(request_id, finish_reason="abort"))
                    return

    def _end_all(self, reason: str) -> None:
        """End every request with an error (shutdown); running ones keep their KV blocks."""
        for worker in self.workers.values():
            scheduler = worker.scheduler
            for seq in [*scheduler.running, *scheduler.prefilling, *scheduler.waiting]:
                scheduler.finish(seq, "error")
                output = RequestOutput(
                    seq.request_id, finish_reason="error", error=reason, usage=seq.usage()
                )
                self._publish(seq, output)
        for seqs in self.seqs_waiting_for_model.values():
            for seq in seqs:
                self._publish(
                    seq, RequestOutput(seq.request_id, finish_reason="error", error=reason)
                )
        self.seqs_waiting_for_model.clear()
        for futures in self.loads_waiting.values():
            for future in futures:
                _resolve(future, error=EngineUnavailableError(reason))
        self.loads_waiting.clear()

    def _on_load(self, name: str, future: asyncio.Future[ServedModel]) -> None:
        if name in self.workers:
            self.workers.move_to_end(name)
            _resolve(future, self.workers[name].model)
        else:
            self.loads_waiting.setdefault(name, []).append(future)

    def _on_unload(self, name: str, future: asyncio.Future[bool]) -> None:
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
        self._settle()
        worker = self.workers.pop(name)
        self.ranks.unload(name)
        for seq in worker.scheduler.drain():  # only waiting ones: it was idle
            self.seqs_waiting_for_model.setdefault(name, []).append(seq)
        try:
            worker.close(self.settings.disk_flush_s)
        except Exception:
            log.exception("%s: could not keep its prefix cache", name)
        log.info("unloaded model %s", name)

    def _serve_waiting_models(self) -> None:
        for name in [*self.seqs_waiting_for_model, *self.loads_waiting]:
            if name not in self.seqs_waiting_for_model and name not in self.loads_waiting:
                continue  # listed twice, served already
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
        seqs = self.seqs_waiting_for_model.pop(name, [])
        futures = self.loads_waiting.pop(name, [])
        try:
            if name not in self.workers:
                log.info("loading model %s", name)
                self._settle()
                model = self.ranks.load(name, self.load_model)
                distributed = self.ranks.distributed
                announce = self.ranks.announcer(name)
                share = model.placement if distributed else None
                pipeline = share is not None and share.strategy == "pipeline"
                self.workers[name] = ModelWorker(
                    model,
                    self.settings,
                    announce,
                    can_measure=not distributed or pipeline,
                    can_use_disk=not distributed,
                    lanes=len(share.stages) if share is not None and pipeline else 1,
                    draft=self._load_draft(name),
                )
        except Exception as exc:
            log.error("loading model %s failed: %s", name, exc)
            for seq in seqs:
                self._publish(
                    seq, RequestOutput(seq.request_id, finish_reason="error", error=str(exc))
                )
            for future in futures:
                _resolve(future, error=exc)
            return
        worker = self.workers[name]
        for seq in seqs:
            self._enqueue(worker, seq)
        for future in futures:
            _resolve(future, worker.model)

    def _load_draft(self, name: str) -> ServedModel | None:
        """The draft model of model ``name``, if it drafts with one, whole on this rank (on
        several ranks, rank 0 drafts alone); None, with a log line, if it cannot load."""
        spec = self.settings.speculative_for(name)
        if spec is None or spec.method != "draft" or spec.draft_model is None:
            return None
        try:
            return self.load_alone(spec.draft_model)
        except Exception as exc:
            log.error("%s: loading its draft model %s failed: %s", name, spec.draft_model, exc)
            return None

    def _step(self, name: str, worker: ModelWorker, settle: bool = False) -> None:
        """Run ``worker``'s next step (or, with ``settle``, every step it has in flight)."""
        try:
            results = self.ranks.together(worker.settle if settle else worker.step)
        except Exception as exc:
            if lost_a_rank(exc):
                raise
            log.error("step of model %s failed:\n%s", name, traceback.format_exc())
            self._fail_worker(name, worker, f"{type(exc).__name__}: {exc}")
            return
        for seq, output in results:
            self._publish(seq, output)

    def _settle(self) -> None:
        """Finish every step in flight: the ranks must be between steps to hear anything else."""
        for name, worker in list(self.workers.items()):
            if worker.in_flight:
                self._step(name, worker, settle=True)

    def _fail_worker(self, name: str, worker: ModelWorker, error: str) -> None:
        """End every sequence of ``worker`` with ``error``; it and the other ranks start over."""
        if worker.in_flight:
            try:  # the other ranks are running them: take their results to stay in step
                self.ranks.together(worker.settle)
            except Exception as exc:
                if lost_a_rank(exc):
                    raise
                log.error("%s: the steps in flight failed too: %s", name, exc)
        for seq in worker.fail():
            self._publish(seq, RequestOutput(seq.request_id, finish_reason="error", error=error))
        self.ranks.reset(name)

    def _publish(self, seq: Sequence, output: RequestOutput) -> None:
        for observe in self.observers:
            observe(seq, output)
        seq.stream.put(output)
        if output.finish_reason is not None:
            self.streams.pop(seq.request_id, None)

    def fail(self, reason: str) -> None:
        """The engine cannot go on (a rank is gone, or its thread failed): end every request,
        say so on /health, and exit with status 1 after ``exit_grace_s``."""
        if self.error is not None:
            return
        self.error = reason
        log.critical("%s; exiting in %g s", reason, self.settings.exit_grace_s)
        for stream in list(self.streams.values()):
            stream.put(RequestOutput(stream.request_id, finish_reason="error", error=reason))
        self.streams.clear()
        self.exit_soon()

    def exit_soon(self) -> None:
        """Exit the process with status 1 after ``exit_grace_s`` (once)."""
        if self._exit_timer is None:
            self._exit_timer = threading.Timer(self.settings.exit_grace_s, os._exit, (1,))
            self._exit_timer.daemon = True
            self._exit_timer.start()
