"""The KV blocks' bookkeeping on its own: chained, salted block hashes; reserving, reusing,
releasing and evicting blocks (least recently used first); where the scheduler copies a
recurrent model's state."""

from __future__ import annotations

from mlxserve.core.engine.scheduler import Scheduler
from mlxserve.core.engine.sequence import Sequence
from mlxserve.core.kv.blocks import BlockManager, block_hashes

from ..support.engine import make_seq


def test_block_hashes_are_chained_and_salted() -> None:
    tokens = list(range(40))
    hashes = block_hashes(tokens, 16, "model-a")
    assert len(hashes) == 2  # the last 8 tokens are not a full block
    assert block_hashes(tokens[:32] + [99] * 8, 16, "model-a") == hashes
    assert block_hashes([1] + tokens[1:], 16, "model-a")[1] != hashes[1]  # chained
    assert block_hashes(tokens, 16, "model-b") != hashes


def test_reserve_reuse_release_and_lru_eviction() -> None:
    manager = BlockManager(num_blocks=6, block_size=4)
    first = manager.reserve(16, [])
    assert manager.used_blocks == 4 and not manager.can_reserve(12, [])
    assert manager.release(first, ["a", "b", "c"]) == ["a", "b", "c"]
    assert manager.used_blocks == 3 and manager.cached_prefix(["a", "b", "x"]) == ["a", "b"]
    second = manager.reserve(12, ["a", "b"])  # reuses two, needs one more
    assert manager.used_blocks == 4
    third = manager.reserve(12, [])  # evicts c, the least recently used idle block
    assert manager.take_evicted() == ["c"]
    assert not manager.can_reserve(4, [])
    manager.release(third, [])
    manager.release(second, ["a", "b", "d"])
    assert manager.cached_prefix(["a", "b", "d"]) == ["a", "b", "d"]
    assert manager.used_blocks == 3


def test_recurrent_state_is_copied_at_the_last_whole_block_and_only_there_reused() -> None:
    """A model with recurrent layers: the first prompt's prefill stops at its last whole
    block to copy the state; a repeat reuses up to that block, not beyond; only the
    ``snapshots`` most recent copies stay."""
    scheduler = Scheduler(4, 512, BlockManager(64, 4), "salt", snapshots=1)
    first = make_seq("a", list(range(1, 12)))  # 11 tokens: the copy at 8
    scheduler.add(first)
    plan = scheduler.schedule()
    (chunk,) = plan.prefill[0]
    assert chunk.tokens == tuple(range(1, 9)) and chunk.snapshot and not chunk.last
    scheduler.postprocess(plan, [], [], [])
    plan = scheduler.schedule()
    assert plan.prefill[0][0].tokens == (9, 10, 11) and plan.prefill[0][0].last
    scheduler.postprocess(plan, [], [], [])  # joins the batch (its token is not needed here)
    scheduler.finish(first, "stop")
    assert scheduler.schedule().keep_states == (("a", chunk.snapshot),)

    longer = make_seq("b", [*range(1, 12), 50, 51, 52, 53, 54])  # shares 11, snapshot at 8
    scheduler.add(longer)
    plan = scheduler.schedule()
    assert longer.cached_tokens == 8 and plan.prefill[0][0].reused
    other = make_seq("c", list(range(100, 111)))
    scheduler.finish(longer, "stop")
    scheduler.add(other)
    scheduler.schedule()
    scheduler.finish(other, "stop")  # finished while prefilling: no copy is kept
    assert scheduler.schedule().keep_states == ()

    third = make_seq("d", list(range(300, 310)))  # a copy at 8, which pushes out the first
    scheduler.add(third)
    for _ in range(2):
        scheduler.postprocess(scheduler.schedule(), [], [], [])
    scheduler.finish(third, "stop")
    plan = scheduler.schedule()
    assert [r for r, _ in plan.keep_states] == ["d"] and plan.drop_states == (chunk.snapshot,)


def test_a_sequence_that_scores_its_prompt_runs_it_all_and_leaves_its_blocks() -> None:
    """Cached blocks hold no log probabilities: a scoring sequence takes none of them (and
    plans no recurrent-state copy), but still leaves its blocks for the next sequences."""
    prompt = list(range(1, 12))

    def scoring(request_id: str) -> Sequence:
        return make_seq(request_id, prompt, max_tokens=0, prompt_logprobs=1)

    scheduler = Scheduler(4, 512, BlockManager(64, 4), "salt")
    for request_id in ("first", "again"):
        seq = scoring(request_id)
        scheduler.add(seq)
        plan = scheduler.schedule()
        (chunk,) = plan.prefill[0]
        assert chunk.tokens == tuple(prompt) and chunk.last and not chunk.reused
        assert seq.cached_tokens == 0
        ((_, output),) = scheduler.postprocess(plan, [seq], [0], [None])  # its token: unused
        assert output.finish_reason == "length" and output.prompt_logprobs == ()
        assert not output.token_ids and seq.output_ids == []
        scheduler.schedule()
    plain = make_seq("plain", prompt)
    scheduler.add(plain)
    scheduler.schedule()
    assert plain.cached_tokens == 8

    recurrent = Scheduler(4, 512, BlockManager(64, 4), "salt", snapshots=2)
    recurrent.add(scoring("recurrent"))
    (chunk,) = recurrent.schedule().prefill[0]
    assert chunk.tokens == tuple(prompt) and not chunk.snapshot
