"""The draft model's proposer: its drafts are the draft model's greedy continuation of each
sequence, however the sequences changed since it last drafted (drafts rejected, tokens
accepted, sequences joining and leaving, prompts prefilled in several chunks)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx

from mlxserve.core.kv.caches import KVCacheOptions
from mlxserve.core.speculative.draft_model import DraftModelProposer
from mlxserve.registry.models import ModelRegistry
from mlxserve.registry.plugins import load_plugins

from ..support.server import write_config


@dataclass
class Drafting:
    """What the proposer reads of a sequence."""

    request_id: str
    prompt_ids: list[int]
    output_ids: list[int] = field(default_factory=list)


def greedy(model: Any, tokens: list[int], most: int) -> list[int]:
    """``most`` tokens of ``model``'s greedy continuation of ``tokens``, on fresh caches."""
    cache, out = model.make_cache(KVCacheOptions()), []
    logits = model.stage.forward(mx.array([tokens]), cache)
    for _ in range(most):
        out.append(int(mx.argmax(logits[0, -1]).item()))
        logits = model.stage.forward(mx.array([[out[-1]]]), cache)
    return out


def test_drafts_are_the_draft_models_greedy_continuation(
    tmp_path: Path, tiny_checkpoints: dict[str, Path]
) -> None:
    config = write_config(
        tmp_path,
        f'[registry]\ndefault_model = "d"\ncache_dir = "{tmp_path / "cache"}"\n'
        f'[models.d]\nsource = "{tiny_checkpoints["llama"]}"\n',
    )
    draft = ModelRegistry(config, load_plugins()).load("d")
    proposer = DraftModelProposer(draft, KVCacheOptions(), 8, draft.vocab_size)
    seqs = {
        "a": Drafting("a", [(i * 7) % 50 + 3 for i in range(21)], [5]),
        "b": Drafting("b", [4, 9, 16], [25]),
        "c": Drafting("c", list(range(3, 30)), [7]),
    }
    # Who drafts in each round, and how much of its draft each then takes (before a token of
    # its own); "b" ends after round 3 and comes back, from the start, in round 5.
    rounds = [
        {"a": 4, "b": 0},
        {"a": 1, "b": 3, "c": 0},
        {"a": 0, "b": 2, "c": 4},
        {"b": 1, "c": 2, "a": 3},
        {"c": 0, "a": 2},
        {"c": 1, "b": 0, "a": 4},
        {"b": 2, "a": 0},
    ]
    for round_, accepted in enumerate(rounds):
        batch = [seqs[r] for r in accepted]
        drafts = proposer.propose(batch, 4)
        for seq, draft_tokens in zip(batch, drafts, strict=True):
            assert draft_tokens == greedy(draft, [*seq.prompt_ids, *seq.output_ids], 4)
            seq.output_ids += draft_tokens[: accepted[seq.request_id]]
            seq.output_ids.append(100 + round_)
        if round_ == 3:
            proposer.forget("b")
        lane = proposer.runner.lane(0)
        assert lane.rows == [r for r in lane.rows if r in accepted]
        assert lane.cache is not None
        held = [len(proposer.fed[r]) for r in lane.rows]
        assert lane.cache[0].offset.tolist() == held  # fed is what the caches hold
