"""The engine's parts on their own: detokenizer, stop strings, sampler, scheduler."""

from __future__ import annotations

import random
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm.utils import load_tokenizer

from mlxserve.core.cpu.parallel_linear import parallelize_linears
from mlxserve.core.distributed.wire import Reader, Writer
from mlxserve.core.engine.detokenizer import IncrementalDetokenizer, TextStream
from mlxserve.core.engine.plan import PrefillChunk, StepPlan
from mlxserve.core.engine.scheduler import Scheduler
from mlxserve.core.sampling.params import InvalidParameterError, SamplingParams
from mlxserve.core.sampling.sampler import sample

from ..support.engine import make_seq, sampled

TEXT = "Ünïcödé 東京 🙂 naïve café — mixed text, and some ASCII too."


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoints: dict[str, Path]):  # noqa: ANN201
    return load_tokenizer(tiny_checkpoints["llama"])


def test_incremental_text_equals_whole_decode(tokenizer) -> None:  # noqa: ANN001
    ids = tokenizer.encode(TEXT)
    assert len(ids) > len(TEXT) / 2  # multi-byte characters span several tokens
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.add(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == tokenizer.decode(ids)
    assert not any("\ufffd" in p for p in pieces)


def test_random_token_streams_never_show_broken_characters(tokenizer) -> None:  # noqa: ANN001
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(30)]
        detok = IncrementalDetokenizer(tokenizer)
        text = "".join(detok.add(i) for i in ids) + detok.flush()
        assert text == tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("stop", ["東京", "ï", "café —", "ASCII too.", "é 東"])
def test_stop_strings_are_never_shown_in_part(tokenizer, stop: str) -> None:  # noqa: ANN001
    stream = TextStream(tokenizer, (stop, "never-there"))
    shown = ""
    for token in tokenizer.encode(TEXT):
        shown += stream.add(token)
        assert not any(shown.endswith(stop[:n]) for n in range(1, len(stop) + 1)) or (
            stream.stopped
        ), f"{shown!r} shows part of {stop!r}"
        if stream.stopped:
            break
    assert stream.stopped and shown == TEXT[: TEXT.index(stop)]


def test_text_without_stop_is_all_shown_at_the_end(tokenizer) -> None:  # noqa: ANN001
    stream = TextStream(tokenizer, ("zzz", "Ünï!"))
    shown = "".join(stream.add(t) for t in tokenizer.encode(TEXT)) + stream.finish()
    assert shown == TEXT and not stream.stopped


def test_sampling_parameters_are_checked() -> None:
    with pytest.raises(InvalidParameterError) as info:
        SamplingParams(top_p=0)
    assert info.value.param == "top_p"
    with pytest.raises(InvalidParameterError, match="logit_bias"):
        SamplingParams(logit_bias=((1, 500.0),))


def test_sampler_rules() -> None:
    logits = mx.array([[1.0, 3.0, 2.0, 0.5], [0.1, 0.2, 5.0, 0.3]])
    greedy = make_seq("a", [1], temperature=0)
    top1 = make_seq("b", [1], temperature=2.0, top_k=1)
    assert sample(logits, [greedy, top1])[0] == [1, 2]
    biased = make_seq("c", [1], temperature=0, logit_bias=((3, 10.0),))
    assert sample(logits[:1], [biased])[0] == [3]
    penalized = make_seq("d", [1], temperature=0, presence_penalty=2.0)
    penalized.append(1)
    assert sample(logits[:1], [penalized])[0] == [2]
    repeated = make_seq("e", [1], temperature=0, repetition_penalty=2.0)
    repeated.append(1)
    assert sample(logits[:1], [repeated])[0] == [2]


def test_seeded_draws_do_not_depend_on_the_batch() -> None:
    logits = mx.random.normal((3, 50), key=mx.random.key(3))
    alone = sample(logits[1:2], [make_seq("x", [1], seed=42, temperature=1.0)])[0]
    batch = [make_seq(r, [1], seed=s, temperature=1.0) for r, s in (("p", 1), ("x", 42), ("q", 2))]
    assert sample(logits, batch)[0][1] == alone[0]
    draws = {
        sample(logits[1:2], [make_seq("x", [1], seed=s, temperature=1.0)])[0][0] for s in range(20)
    }
    assert len(draws) > 3


def test_top_p_and_min_p_keep_only_likely_tokens() -> None:
    logits = mx.log(mx.array([[0.6, 0.3, 0.05, 0.05]]))
    for seed in range(30):
        top_p = make_seq("a", [1], seed=seed, temperature=1.0, top_p=0.5)
        min_p = make_seq("b", [1], seed=seed, temperature=1.0, min_p=0.4)
        assert sample(logits, [top_p])[0] == [0]
        assert sample(logits, [min_p])[0][0] in (0, 1)


def test_logprobs_are_normalized() -> None:
    logits = mx.array([[1.0, 2.0, 3.0]])
    seq = make_seq("a", [1], temperature=0, logprobs=True, top_logprobs=2)
    [token], [logprob] = sample(logits, [seq])
    assert token == 2 and logprob.top[0][0] == 2 and len(logprob.top) == 2
    assert abs(sum(mx.exp(mx.array([p for _, p in logprob.top]))).item() - 0.9) < 0.01


def test_long_prompt_is_chunked_and_running_streams_keep_decoding(tokenizer) -> None:  # noqa: ANN001
    scheduler = Scheduler(max_batch_size=4, prefill_step_size=8)
    running = make_seq("run", [1, 2, 3], tokenizer, max_tokens=50)
    scheduler.add(running)
    plan = scheduler.schedule()
    scheduler.postprocess(plan, sampled(scheduler, plan), [5], [None])
    scheduler.add(make_seq("long", list(range(1, 30)), tokenizer, max_tokens=5))
    chunks = []
    for _ in range(4):
        plan = scheduler.schedule()
        assert plan.decode_ids == ("run",), "the running stream must decode every step"
        [[chunk]] = plan.prefill
        chunks.append((chunk.start, len(chunk.tokens), chunk.last))
        n = len(plan.sample_ids)
        scheduler.postprocess(plan, sampled(scheduler, plan), [5] * n, [None] * n)
    assert chunks == [(0, 8, False), (8, 8, False), (16, 8, False), (24, 5, True)]
    assert scheduler.schedule().decode_ids == ("run", "long")


def test_short_fresh_prompts_are_prefilled_together(tokenizer) -> None:  # noqa: ANN001
    scheduler = Scheduler(max_batch_size=8, prefill_step_size=64)
    for i in range(3):
        scheduler.add(make_seq(f"s{i}", [1] * (3 + i), tokenizer))
    plan = scheduler.schedule()
    assert [[c.request_id for c in g] for g in plan.prefill] == [["s0", "s1", "s2"]]
    assert plan.sample_ids == ("s0", "s1", "s2")


def test_batch_size_limits_admission(tokenizer) -> None:  # noqa: ANN001
    scheduler = Scheduler(max_batch_size=2, prefill_step_size=64)
    for i in range(3):
        scheduler.add(make_seq(f"s{i}", [1, 2], tokenizer))
    plan = scheduler.schedule()
    assert plan.sample_ids == ("s0", "s1") and len(scheduler.waiting) == 1


def test_invalid_bytes_never_grow_the_decoded_window(tokenizer) -> None:  # noqa: ANN001
    invalid = [i for i in range(256) if tokenizer.decode([i, i, i, i]) == "\ufffd" * 4]
    continuation = invalid[:1]  # a byte that is never text, however many follow
    assert continuation
    detok = IncrementalDetokenizer(tokenizer)
    widest = 0
    pieces = []
    for _ in range(2000):
        pieces.append(detok.add(continuation[0]))
        widest = max(widest, len(detok.ids) - detok.prefix_offset)
    pieces.append(detok.flush())
    assert widest <= 16  # not 2,000: each token decodes a short window
    assert "".join(pieces) == tokenizer.decode(continuation * 2000)


@pytest.mark.parametrize("peak", [8.0, 0.1], ids=["peaked", "flat"])
def test_filters_ranking_few_candidates_equal_a_full_sort(peak: float) -> None:
    from mlxserve.core.sampling.sampler import _filter, _keep

    vocab = 4096
    logits = mx.random.normal((6, vocab), key=mx.random.key(5)) * peak
    params = [
        SamplingParams(top_p=0.9),
        SamplingParams(top_k=40),
        SamplingParams(top_k=300, top_p=0.95),
        SamplingParams(min_p=0.05),
        SamplingParams(top_p=0.999),
        SamplingParams(),
    ]
    full = _keep(logits, params, vocab)
    assert full is not None
    assert mx.array_equal(_filter(logits, params), full).item()
    if peak > 1:  # a peaked distribution fits in the candidates: no full sort was needed
        assert _keep(logits, params, 512) is not None
    else:  # a flat one does not: the short ranking declines, the full sort answers
        assert _keep(logits, params, 512) is None


def test_a_parallel_linear_equals_the_linear_it_replaces() -> None:
    model = nn.Sequential(nn.Linear(64, 37), nn.Linear(37, 3, bias=False), nn.Linear(3, 2))
    mx.eval(model.parameters())
    x = mx.random.normal((5, 64))
    expected = model(x)
    assert parallelize_linears(model, 3, min_elements=64 * 37 + 1) == 0  # all too small
    assert parallelize_linears(model, 3, min_elements=0) == 2  # the last: fewer outputs than parts
    assert [type(m).__name__ for m in model.layers] == ["ParallelLinear"] * 2 + ["Linear"]
    assert [p.shape[0] for p in model.layers[0].parts] == [12, 12, 13]
    assert mx.allclose(model(x), expected, atol=1e-5).item()


def test_a_step_plan_survives_the_wire() -> None:
    plan = StepPlan(
        lane=1,
        release=("gone",),
        save=(("done", ((0, "ab12"), (3, "cd34"))),),
        evict=("ef56",),
        decode_ids=("a", "b"),
        decode_tokens=(5, 70_000),  # past one varint byte
        prefill=(
            (PrefillChunk("c", (1, 2, 3), 0, True, ("ab12",)), PrefillChunk("d", (4,), 0, True)),
            (PrefillChunk("é", tuple(range(300)), 16, False, snapshot="ff00"),),
        ),
        keep_states=(("done", "cd34"),),
        drop_states=("0a0b",),
    )
    assert StepPlan.decode(plan.encode()) == plan
    assert StepPlan.decode(StepPlan().encode()) == StepPlan()
    with pytest.raises(ValueError):
        Writer().uint(-1)
    with pytest.raises(ValueError, match="truncated"):
        Reader(Writer().text("a long request id").data[:5]).text()
