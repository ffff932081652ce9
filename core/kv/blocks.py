"""KV blocks: the budget in blocks, content hashes of full blocks, and which are cached.

A sequence reserves, when it is admitted, every block it may ever need (prompt plus
max_tokens), so a running sequence never runs out of KV memory. Full blocks are named by a
chained content hash (the previous block's hash, the block's tokens, the model), the same on
every rank and across restarts; when their sequences end they stay cached, least recently
used first out, until the budget needs them.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Collection, Sequence
from dataclasses import dataclass


def block_hashes(tokens: Sequence[int], block_size: int, salt: str) -> list[str]:
    """The chained hash of every full block of ``tokens``."""
    hashes, parent = [], salt
    for start in range(0, len(tokens) - block_size + 1, block_size):
        block = ",".join(map(str, tokens[start : start + block_size]))
        parent = hashlib.blake2b(f"{parent}|{block}".encode(), digest_size=16).hexdigest()
        hashes.append(parent)
    return hashes


@dataclass
class Reservation:
    """What one sequence holds: the cached blocks it reuses and the blocks it reserved."""

    reused: list[str]
    reserved: int


class BlockManager:
    """Counts KV blocks against the budget and keeps the cache of full blocks.

    ``cached`` maps a block hash to how many running sequences use it; blocks no sequence
    uses are kept in LRU order in ``idle`` and evicted when the budget needs room.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.in_use: dict[str, int] = {}
        self.idle: OrderedDict[str, None] = OrderedDict()
        self.reserved = 0
        self.evicted: list[str] = []

    @property
    def used_blocks(self) -> int:
        return self.reserved + len(self.in_use) + len(self.idle)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def cached_prefix(self, hashes: Sequence[str]) -> list[str]:
        """The longest run of ``hashes``, from the start, whose blocks are cached."""
        hits = []
        for block_hash in hashes:
            if block_hash not in self.in_use and block_hash not in self.idle:
                break
            hits.append(block_hash)
        return hits

    def can_reserve(self, total_tokens: int, reused: Sequence[str]) -> bool:
        need = self.blocks_for(total_tokens) - len(reused)
        evictable = sum(1 for h in self.idle if h not in reused)
        return need <= self.num_blocks - self.used_blocks + evictable

    def reserve(self, total_tokens: int, reused: Sequence[str]) -> Reservation:
        """Take the blocks for a sequence of up to ``total_tokens`` reusing ``reused``."""
        for block_hash in reused:
            if block_hash in self.idle:
                del self.idle[block_hash]
            self.in_use[block_hash] = self.in_use.get(block_hash, 0) + 1
        need = self.blocks_for(total_tokens) - len(reused)
        while self.used_blocks + need > self.num_blocks and self.idle:
            evicted, _ = self.idle.popitem(last=False)
            self.evicted.append(evicted)
        assert self.used_blocks + need <= self.num_blocks, "reserve() without can_reserve()"
        self.reserved += need
        return Reservation(list(reused), need)

    def release(self, reservation: Reservation, full_blocks: Sequence[str]) -> list[str]:
        """Give back a sequence's blocks; its ``full_blocks`` stay cached. The newly cached."""
        self.reserved -= reservation.reserved
        for block_hash in reservation.reused:
            self.in_use[block_hash] -= 1
            if self.in_use[block_hash] == 0:
                del self.in_use[block_hash]
                self.idle[block_hash] = None
        added = []
        for block_hash in full_blocks[len(reservation.reused) :]:
            if block_hash in self.in_use or block_hash in self.idle:
                continue
            if self.used_blocks >= self.num_blocks:
                if not self.idle:
                    break
                evicted, _ = self.idle.popitem(last=False)
                self.evicted.append(evicted)
            self.idle[block_hash] = None
            added.append(block_hash)
        return added

    def adopt(self, block_hash: str, keep: Collection[str] = ()) -> bool:
        """Count a block brought back from disk as cached (idle); False if there is no room.

        Room is made by evicting the least recently used idle block that is not in ``keep``
        (the blocks the same request is about to reuse).
        """
        if self.used_blocks >= self.num_blocks:
            victim = next((h for h in self.idle if h not in keep), None)
            if victim is None:
                return False
            del self.idle[victim]
            self.evicted.append(victim)
        if block_hash in self.evicted:  # evicted earlier in this step: it stays after all
            self.evicted.remove(block_hash)
        self.idle[block_hash] = None
        return True

    def take_evicted(self) -> list[str]:
        evicted, self.evicted = self.evicted, []
        return evicted
