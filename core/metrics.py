"""Prometheus metrics of an engine: counters and histograms fed by its outputs, gauges read
from it at scrape time, in a registry of its own."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from mlxserve.core.engine.sequence import RequestOutput, Sequence

if TYPE_CHECKING:
    from mlxserve.core.engine.engine import Engine
    from mlxserve.core.engine.worker import ModelWorker
    from mlxserve.core.kv.disk_tier import DiskTier

PREFIX = "mlxserve_"
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.3, 0.5, 1, 2.5)


def _running(worker: ModelWorker) -> float:
    return len(worker.scheduler.running) + len(worker.scheduler.prefilling)


def _kv_usage(worker: ModelWorker) -> float | None:
    blocks = worker.scheduler.blocks
    if blocks is None or not blocks.num_blocks:
        return None
    return min(1.0, blocks.used_blocks / blocks.num_blocks)


def _disk(worker: ModelWorker) -> DiskTier | None:
    return worker.runner.prefix_store.disk


def _disk_enabled(worker: ModelWorker) -> float | None:
    disk = _disk(worker)
    return None if disk is None else float(disk.enabled)


def _disk_writable(worker: ModelWorker) -> float | None:
    disk = _disk(worker)
    return None if disk is None else float(disk.writing)


GAUGES: tuple[tuple[str, str, Callable[[ModelWorker], float | None]], ...] = (
    ("requests_running", "Requests in the batch (prefilling or decoding).", _running),
    ("requests_waiting", "Requests waiting for a batch slot.", lambda w: len(w.scheduler.waiting)),
    (
        "kv_cache_usage_ratio",
        "KV blocks taken (by requests or the prefix cache) over the KV budget's blocks.",
        _kv_usage,
    ),
    ("kv_cache_capacity_tokens", "The model's KV budget in tokens.", lambda w: w.capacity_tokens),
    (
        "prefix_cache_enabled",
        "1 if the model's prompts share KV blocks through the prefix cache; 0 if it is off "
        "for the model (by configuration, or because its cache kinds cannot share blocks: "
        "sliding, chunked, recurrent, quantized; the log says which).",
        lambda w: float(w.prefix_caching),
    ),
    (
        "micro_batches",
        "Lanes the running requests are split into (one per pipeline stage; 1 on one rank).",
        lambda w: w.lanes,
    ),
    (
        "disk_tier_enabled",
        "1 while the KV disk tier reads and writes; 0 while a disk fault keeps it (or its "
        "writes) off. Absent for models without one.",
        _disk_enabled,
    ),
    (
        "disk_tier_writable",
        "1 while the KV disk tier writes blocks; 0 while a disk fault keeps its writes off "
        "(they are tried again, less and less often). Absent for models without one.",
        _disk_writable,
    ),
)
# The disk tier's counters (0 for models without one).
DISK_COUNTERS: tuple[tuple[str, str, Callable[[DiskTier], int]], ...] = (
    ("disk_tier_reads", "KV blocks read back from the disk tier.", lambda d: d.reads),
    ("disk_tier_writes", "KV blocks written to the disk tier.", lambda d: d.writes),
    (
        "disk_tier_failures",
        "Disk errors met by the disk tier (not those of tries while its writes were off).",
        lambda d: sum(d.failures.values()),
    ),
    (
        "disk_tier_write_retries",
        "Blocks the disk tier tried to write while a fault kept its writes off, to see "
        "whether the disk takes them again.",
        lambda d: d.write_retries,
    ),
    (
        "disk_tier_dropped_writes",
        "KV blocks not written because the disk tier's writer was too far behind.",
        lambda d: d.dropped_writes,
    ),
    (
        "disk_tier_rejected_blocks",
        "Disk tier files dropped because they did not hold a valid block for the model.",
        lambda d: d.rejected,
    ),
)

WORKER_COUNTERS = (
    ("steps", "Engine steps run (one lane's step each).", "steps"),
    (
        "overlapped_steps",
        "Steps that ran while another lane's step was already on its way through the pipeline.",
        "overlapped_steps",
    ),
)

# Speculative decoding's counters, by model and method (absent for models that do not draft).
SPECULATIVE_COUNTERS = (
    (
        "speculative_draft_tokens",
        "Tokens drafted for verification (speculative decoding).",
        "drafted_tokens",
    ),
    (
        "speculative_accepted_tokens",
        "Drafted tokens that verification accepted (each saved a step).",
        "accepted_tokens",
    ),
)


class _ModelMetrics:
    """The metric children of one model (labels resolved once, so observing stays cheap)."""

    def __init__(self, metrics: EngineMetrics, model: str) -> None:
        self.model = model
        self.prompt = metrics.prompt_tokens.labels(model)
        self.generation = metrics.generation_tokens.labels(model)
        self.queried = metrics.prefix_queried.labels(model)
        self.hits = metrics.prefix_hits.labels(model)
        self.ttft = metrics.ttft.labels(model)
        self.itl = metrics.itl.labels(model)


@dataclass(slots=True)
class _Live:
    """A request seen by the observer: its model's metrics, when it last gave tokens."""

    model: _ModelMetrics
    last: float | None = None


class EngineMetrics:
    """The Prometheus metrics of ``engine``, in ``self.registry`` (never the global one).

    ``observe`` (an engine observer) runs on the engine thread and only touches
    prometheus_client metrics, which lock themselves, and its own per-request state;
    ``collect`` runs at scrape time and reads snapshots of the engine's state.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.registry = CollectorRegistry()
        self.requests = self._counter("requests", "Finished requests.", "finish_reason")
        self.prompt_tokens = self._counter(
            "prompt_tokens", "Prompt tokens of requests that got a first token."
        )
        self.generation_tokens = self._counter("generation_tokens", "Generated tokens.")
        self.prefix_queried = self._counter(
            "prefix_cache_queried_tokens", "Prompt tokens looked up in the prefix cache."
        )
        self.prefix_hits = self._counter(
            "prefix_cache_hit_tokens", "Prompt tokens found in the prefix cache."
        )
        self.ttft = self._histogram(
            "time_to_first_token_seconds", "From arrival to the first token.", TTFT_BUCKETS
        )
        self.itl = self._histogram(
            "inter_token_latency_seconds", "Between consecutive tokens of a request.", ITL_BUCKETS
        )
        self.http_errors = Counter(
            PREFIX + "http_errors",
            "Requests answered with an error, by HTTP status and error code.",
            ["status", "code"],
            registry=self.registry,
        )
        self.request_errors = self._counter(
            "request_errors",
            "Admitted requests that ended without finishing: generation_failed, "
            "output_format_failed (the request's grammar could not go on), timeout or "
            "client_disconnected.",
            "kind",
        )
        self._models: dict[str, _ModelMetrics] = {}
        self._live: dict[str, _Live] = {}
        self.registry.register(self)
        engine.observers.append(self.observe)

    def _counter(self, name: str, doc: str, *labels: str) -> Counter:
        return Counter(PREFIX + name, doc, ["model", *labels], registry=self.registry)

    def _histogram(self, name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
        return Histogram(PREFIX + name, doc, ["model"], buckets=buckets, registry=self.registry)

    # ---- the event loop ------------------------------------------------------------------

    def http_error(self, status: int, code: str) -> None:
        """Count a request answered with an error (``code``: the body's code, else its type)."""
        self.http_errors.labels(str(status), code).inc()

    def request_error(self, model: str, kind: str) -> None:
        """Count an admitted request that ended early (``kind``: why)."""
        self.request_errors.labels(model, kind).inc()

    # ---- the engine thread ---------------------------------------------------------------

    def observe(self, seq: Sequence, output: RequestOutput) -> None:
        live = self._live.get(output.request_id)
        if live is None:
            live = self._live[output.request_id] = _Live(self._for_model(seq))
        if output.token_ids:
            self._tokens(seq, live, len(output.token_ids))
        if output.finish_reason is not None:
            del self._live[output.request_id]
            self.requests.labels(live.model.model, output.finish_reason).inc()

    def _tokens(self, seq: Sequence, live: _Live, count: int) -> None:
        now, model = time.perf_counter(), live.model
        model.generation.inc(count)
        if live.last is None:  # the prompt is in: count it once
            model.prompt.inc(len(seq.prompt_ids))
            model.queried.inc(len(seq.prompt_ids))
            model.hits.inc(seq.cached_tokens)
            if seq.first_token_time is not None:
                model.ttft.observe(seq.first_token_time - seq.arrival_time)
        else:
            gap = (now - live.last) / count
            for _ in range(count):
                model.itl.observe(gap)
        live.last = now

    def _for_model(self, seq: Sequence) -> _ModelMetrics:
        model = self._models.get(seq.model)
        if model is None:
            model = self._models[seq.model] = _ModelMetrics(self, seq.model)
        return model

    # ---- scrape time ---------------------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        workers = tuple(self.engine.workers.items())
        yield GaugeMetricFamily(
            PREFIX + "requests_queued",
            "Requests submitted and not yet in a batch (all models).",
            value=self.engine.queue_depth(),
        )
        for name, doc, read in GAUGES:
            gauge = GaugeMetricFamily(PREFIX + name, doc, labels=["model"])
            for model, worker in workers:
                value = read(worker)
                if value is not None:
                    gauge.add_metric([model], value)
            yield gauge
        disks = [(model, _disk(worker)) for model, worker in workers]
        for name, doc, read_disk in DISK_COUNTERS:
            counter = CounterMetricFamily(PREFIX + name, doc, labels=["model"])
            for model, disk in disks:
                counter.add_metric([model], 0 if disk is None else read_disk(disk))
            yield counter
        for name, doc, attribute in SPECULATIVE_COUNTERS:
            counter = CounterMetricFamily(PREFIX + name, doc, labels=["model", "method"])
            for model, worker in workers:
                if worker.speculator is not None:
                    method = worker.speculator.method
                    counter.add_metric([model, method], getattr(worker.speculator, attribute))
            yield counter
        for name, doc, attribute in WORKER_COUNTERS:
            counter = CounterMetricFamily(PREFIX + name, doc, labels=["model"])
            for model, worker in workers:
                counter.add_metric([model], getattr(worker, attribute))
            yield counter
