"""Heartbeats: how rank 0 tells a rank that is slow from one that is gone.

MLX's collectives cannot be used from a second thread beside the main one, so liveness has a
channel of its own: a daemon thread on every other rank sends rank 0 a small UDP datagram a few
times a second for as long as its process runs, also while MLX computes (``mx.eval`` releases
the GIL). A killed or stopped (SIGSTOP) process, or an unreachable machine, sends nothing.
Rank 0 listens on UDP at its own address (the first IP of its host in the launch hostfile)
and port ``[distributed] starting_port``, whatever the backend (hostfile.py,
``heartbeat_address``), and answers each beat: a rank whose beats go unanswered for the step
timeout, once rank 0 has answered, is cut off from a rank 0 that is gone (a pulled cable
leaves it waiting on a connection that never ends), and ends itself.
"""

from __future__ import annotations

import contextlib
import math
import socket
import threading
import time
from collections.abc import Callable

BEAT = "mlxserve-beat"
Address = tuple[str, int]


def beat_interval(step_timeout_s: float) -> float:
    """How often a rank beats: several times within any step timeout."""
    return min(0.5, step_timeout_s / 4)


def _udp_socket(address: Address) -> socket.socket:
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    return socket.socket(family, socket.SOCK_DGRAM)


class HeartbeatSender:
    """A rank's pulse: "rank N of launch T is alive", to rank 0, until stopped.

    Rank 0's answers are heard too: once rank 0 has answered, ``on_silent`` is called (once,
    with the seconds of silence) if it then stays silent for more than ``silent_s``.
    """

    def __init__(
        self,
        address: Address,
        token: int,
        rank: int,
        interval_s: float,
        on_silent: Callable[[float], None] | None = None,
        silent_s: float = math.inf,
    ) -> None:
        self.address = address
        self.message = f"{BEAT} {token} {rank}".encode()
        self.answer = f"{BEAT} {token} 0".encode()
        self.interval_s = interval_s
        self.on_silent = on_silent
        self.silent_s = silent_s
        self.last_answer: float | None = None  # when rank 0 last answered
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mlxserve-heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(self.interval_s + 1)

    def _run(self) -> None:
        with _udp_socket(self.address) as sock:
            while True:
                with contextlib.suppress(OSError):  # rank 0 not listening yet, or gone
                    sock.sendto(self.message, self.address)
                self._hear_answers(sock, self.interval_s)
                if self._stopped.is_set():
                    return
                silence = time.monotonic() - (self.last_answer or math.inf)
                if silence > self.silent_s and self.on_silent is not None:
                    on_silent, self.on_silent = self.on_silent, None
                    on_silent(silence)

    def _hear_answers(self, sock: socket.socket, seconds: float) -> None:
        """Take in rank 0's answers for ``seconds`` (less once stopped)."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0 and not self._stopped.is_set():
            sock.settimeout(min(left, 0.1))
            try:
                data = sock.recv(128)
            except TimeoutError:
                continue
            except OSError:  # not bound yet (no beat could be sent): nothing to hear
                self._stopped.wait(left)
                return
            if data == self.answer:
                self.last_answer = time.monotonic()


class HeartbeatListener:
    """Rank 0's ear: when each other rank of this launch was last heard from.

    Raises:
        OSError: the address cannot be bound.
    """

    def __init__(self, address: Address, token: int) -> None:
        self.token = str(token)
        self.answer = f"{BEAT} {token} 0".encode()
        self.last_heard: dict[int, float] = {}
        self._sock = _udp_socket(address)
        try:
            self._sock.bind(address)
        except OSError:
            self._sock.close()
            raise

    def listen(self, seconds: float) -> None:
        """Take in the beats that arrive within ``seconds``."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self._sock.settimeout(left)
            try:
                data, sender = self._sock.recvfrom(128)
            except TimeoutError:
                return
            rank = self._sender(data)
            if rank is not None:
                self.last_heard[rank] = time.monotonic()
                with contextlib.suppress(OSError):  # the rank is gone again
                    self._sock.sendto(self.answer, sender)

    def close(self) -> None:
        self._sock.close()

    def _sender(self, data: bytes) -> int | None:
        """The rank that sent ``data``, if it is a beat of this launch."""
        parts = data.decode("ascii", "replace").split()
        if len(parts) == 3 and parts[0] == BEAT and parts[1] == self.token and parts[2].isdigit():
            return int(parts[2])
        return None
