"""The engine and its scheduler in-process: one request's fault ends that request alone; a block
read from disk never evicts one the same request reuses; the queue is first come, first served.
(A request that can never fit is refused at once: api/test_kv_cache.py.)"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from mlx_lm.utils import load_tokenizer

from mlxserve.core.engine.engine import Engine, RequestStream
from mlxserve.core.engine.scheduler import Scheduler
from mlxserve.core.engine.settings import EngineSettings
from mlxserve.core.kv.blocks import BlockManager, block_hashes
from mlxserve.core.sampling.params import SamplingParams
from mlxserve.registry.models import ModelRegistry
from mlxserve.registry.plugins import load_plugins

from ..support.engine import make_seq, sampled
from ..support.server import write_config

PROMPT_A = [(i * 37) % 250 + 3 for i in range(40)]  # two full KV blocks
PROMPT_B = [42, 17, 3, 99, 61]


def run_on_engine(config: Any, scenario: Callable[[Engine], Awaitable[Any]]) -> Any:
    registry = ModelRegistry(config, load_plugins())
    engine = Engine(registry.load, EngineSettings.from_config(config))
    engine.start()
    try:
        return asyncio.run(scenario(engine))
    finally:
        engine.stop()


async def finish(stream: RequestStream) -> tuple[str, str | None, str | None, int]:
    text, reason, error, cached = "", None, None, 0
    async for output in stream:
        text += output.text
        reason, error = output.finish_reason, output.error
        cached = output.usage.cached_tokens if output.usage else cached
    return text, reason, error, cached


def broken(params: SamplingParams, field: str, value: object) -> SamplingParams:
    """Parameters with a value validation would refuse: a stand-in for a bug that slips by."""
    object.__setattr__(params, field, value)
    return params


@pytest.fixture
def config(tmp_path: Path, tiny_checkpoints: dict[str, Path]) -> Any:
    return write_config(
        tmp_path,
        f'[registry]\ndefault_model = "m"\ncache_dir = "{tmp_path / "cache"}"\n'
        f'[models.m]\nsource = "{tiny_checkpoints["llama"]}"\n'
        "[kv_cache]\nmax_sequence_length = 256\n",
    )


@pytest.mark.parametrize(
    ("field", "value"),
    [("logit_bias", ((3, "not a number"),)), ("stop", (123,))],
    ids=["sampler", "stop-strings"],
)
def test_a_fault_of_one_sequence_ends_it_alone(config: Any, field: str, value: object) -> None:
    async def scenario(engine: Engine) -> None:
        model = await engine.model("m")
        good = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
        alone, *_ = await finish(engine.submit(model, PROMPT_A, good))
        bad = broken(SamplingParams(temperature=0, max_tokens=30, ignore_eos=True), field, value)
        results = await asyncio.gather(
            finish(engine.submit(model, PROMPT_A, good)),
            finish(engine.submit(model, PROMPT_B, bad)),
        )
        (text, reason, _, _), (_, bad_reason, bad_error, _) = results
        assert (text, reason) == (alone, "length")
        assert bad_reason == "error" and bad_error
        again, reason, _, cached = await finish(engine.submit(model, PROMPT_A, good))
        assert (again, reason, cached) == (alone, "length", 32)  # the prefix cache survived

    run_on_engine(config, scenario)


def test_a_block_from_disk_never_evicts_a_block_the_same_request_reuses(tokenizer: Any) -> None:
    blocks = BlockManager(num_blocks=6, block_size=4)
    prompt = list(range(1, 14))  # three full blocks, all reusable
    h0, h1, h2 = block_hashes(prompt, 4, "salt")
    blocks.idle = OrderedDict.fromkeys([h0, h1, "other-1", "other-2"])  # h0 least recent
    blocks.reserve(8, [])  # a running sequence: the budget is now full
    scheduler = Scheduler(4, 64, blocks, "salt", lambda h, keep: h == h2 and blocks.adopt(h, keep))
    seq = make_seq("s", prompt, tokenizer, max_tokens=1)
    scheduler.add(seq)
    plan = scheduler.schedule()
    assert seq.reused == (h0, h1, h2)
    assert not set(plan.evict) & set(seq.reused)
    assert sorted(plan.evict) == ["other-1", "other-2"]


def test_the_queue_is_first_come_first_served(tokenizer: Any) -> None:
    scheduler = Scheduler(8, 64, BlockManager(num_blocks=4, block_size=4))
    running = make_seq("running", [1] * 8, tokenizer, max_tokens=4)  # 3 blocks
    head = make_seq("head", [2] * 4, tokenizer, max_tokens=4)  # 2 blocks: not yet
    small = make_seq("small", [3] * 2, tokenizer, max_tokens=1)  # 1 block: would fit
    for seq in (running, head, small):
        scheduler.add(seq)
    plan = scheduler.schedule()
    assert plan.sample_ids == ("running",)
    assert [s.request_id for s in scheduler.waiting] == ["head", "small"]
    scheduler.postprocess(plan, sampled(scheduler, plan), [7], [None])
    scheduler.finish(running, "stop")
    plan = scheduler.schedule()
    assert plan.sample_ids == ("head", "small")


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoints: dict[str, Path]) -> Any:
    return load_tokenizer(tiny_checkpoints["llama"])
