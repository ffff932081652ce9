"""Rank 0's watchdog and the ranks' heartbeats, in-process: a pretend group on loopback UDP,
no ranks started. A rank that beats is never lost however long it computes; a silent one is
lost within the step timeout; a stuck step ends even while every rank beats."""

from __future__ import annotations

import math
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import SimpleNamespace

import mlx.core as mx
import pytest

from mlxserve.core.distributed.cluster import Cluster
from mlxserve.core.distributed.heartbeat import HeartbeatSender, beat_interval
from mlxserve.core.distributed.ranks import RankZero, lost_a_rank


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def watched(
    timeout_s: float, beat_token: int | None, max_step_s: float | None = None
) -> Iterator[tuple[RankZero, list[tuple[float, str]]]]:
    """Rank 0's side of a pretend group whose rank 1 beats with ``beat_token``."""
    address = ("127.0.0.1", free_udp_port())
    cluster = Cluster(None, 0, 2, address, launch_token=7)
    lost: list[tuple[float, str]] = []
    ranks = RankZero(
        cluster, timeout_s, lambda why: lost.append((time.monotonic(), why)), max_step_s
    )
    ranks.start()
    sender = None
    if beat_token is not None:
        sender = HeartbeatSender(address, beat_token, 1, beat_interval(timeout_s))
        sender.start()
    try:
        yield ranks, lost
    finally:
        ranks.lost = True  # ends the watchdog
        if sender is not None:
            sender.stop()


def long_mlx_work(seconds: float) -> Callable[[], None]:
    """One ``mx.eval`` that computes for about ``seconds`` (never returning to Python)."""
    a = mx.random.normal((512, 512)) / 32

    def steps(count: int) -> None:
        x = a
        for _ in range(count):
            x = (x @ a) / mx.abs(x).max()
        mx.eval(x)

    steps(4)  # warm up (BLAS threads, buffers) before timing one step
    start = time.monotonic()
    steps(16)
    one = max((time.monotonic() - start) / 16, 1e-5)
    count = min(math.ceil(seconds / one), 200_000)

    def work() -> None:
        steps(count)

    return work


def test_a_rank_that_beats_is_never_lost_however_long_it_computes() -> None:
    with watched(0.4, beat_token=7) as (ranks, lost):
        time.sleep(0.3)
        started = time.monotonic()
        ranks.together(long_mlx_work(3.0))
        took = time.monotonic() - started
        assert not lost, lost
        assert took > 3 * 0.4, f"the work took only {took:.2f} s: it proves nothing"


def test_a_silent_rank_is_lost_within_the_step_timeout() -> None:
    with watched(0.4, beat_token=None) as (ranks, lost):
        started = time.monotonic()
        ranks.together(lambda: time.sleep(1.5))
        [(when, why)] = lost
        assert "rank 1 did not answer within" in why and "no heartbeat" in why
        assert 0.4 <= when - started < 1.2


def test_a_beat_of_another_launch_does_not_count() -> None:
    with watched(0.4, beat_token=8) as (ranks, lost):
        ranks.together(lambda: time.sleep(1.5))
        assert len(lost) == 1 and "rank 1 did not answer within" in lost[0][1]


def test_a_stuck_step_is_ended_even_while_every_rank_beats() -> None:
    with watched(0.3, beat_token=7, max_step_s=1.0) as (ranks, lost):
        started = time.monotonic()
        ranks.together(lambda: time.sleep(2.0))
        [(when, why)] = lost
        assert "did not end within 1 s" in why
        assert 1.0 <= when - started < 1.8


def test_a_load_is_not_capped_while_the_ranks_beat() -> None:
    done = threading.Event()
    with watched(0.3, beat_token=7, max_step_s=0.6) as (ranks, lost):
        ranks.link.send = lambda message: None  # type: ignore[method-assign]
        ranks.cluster.gather = lambda value: [value, 1]  # type: ignore[method-assign]
        loaded = SimpleNamespace(placement=None)  # a model, as far as load looks at one
        ranks.load("m", lambda name: time.sleep(1.5) or done.set() or loaded)
        assert done.is_set() and not lost, lost


def test_a_lost_peer_is_recognised_in_each_backends_words() -> None:
    """MLX raises a communication's failure as a RuntimeError in its backend's words (MPI
    raises nothing: Open MPI ends the process, and mpirun the group)."""
    assert lost_a_rank(RuntimeError("[ring] connection to a peer was lost"))
    assert lost_a_rank(RuntimeError("[jaccl] Send failed with error code 22"))
    assert lost_a_rank(RuntimeError("[jaccl] Recv failed with error code 5"))
    assert not lost_a_rank(RuntimeError("[metal] Command buffer execution failed"))
    assert not lost_a_rank(ValueError("[ring] not raised this way"))


def test_a_rank_whose_rank_zero_stops_answering_is_told_within_the_step_timeout() -> None:
    """Rank 0 answers every beat; once it stops (gone, or the link cut) the rank is told,
    once: its own ring connection may never end (a pulled cable sends no reset)."""
    address = ("127.0.0.1", free_udp_port())
    ranks = RankZero(Cluster(None, 0, 2, address, launch_token=7), 0.4, lambda why: None)
    ranks.start()
    told: list[tuple[float, float]] = []
    sender = HeartbeatSender(
        address, 7, 1, beat_interval(0.4), lambda s: told.append((time.monotonic(), s)), 0.4
    )
    sender.start()
    try:
        time.sleep(1.2)  # three step timeouts, answered all along
        assert sender.last_answer is not None and not told
        ranks.lost = True  # rank 0's watchdog ends: nothing answers any more
        stopped = time.monotonic()
        time.sleep(1.5)
        [(when, silence)] = told
        assert silence > 0.4 and when - stopped < 1.2, (silence, when - stopped)
    finally:
        ranks.lost = True
        sender.stop()


@pytest.mark.parametrize("rank_zero_token", [None, 8])
def test_a_rank_never_answered_is_never_told(rank_zero_token: int | None) -> None:
    """No answer ever (rank 0's UDP port blocked, or a rank 0 of another launch): no verdict,
    as before answers existed."""
    address = ("127.0.0.1", free_udp_port())
    ranks = None
    if rank_zero_token is not None:
        ranks = RankZero(Cluster(None, 0, 2, address, rank_zero_token), 0.3, lambda why: None)
        ranks.start()
    told: list[float] = []
    sender = HeartbeatSender(address, 7, 1, beat_interval(0.3), told.append, 0.3)
    sender.start()
    try:
        time.sleep(1.2)
        assert sender.last_answer is None and not told
    finally:
        sender.stop()
        if ranks is not None:
            ranks.lost = True
