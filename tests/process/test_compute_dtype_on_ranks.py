"""Two ranks (pipeline or tensor) of a 4-bit checkpoint both compute in float32 and give the
text one rank gives."""

from __future__ import annotations

from pathlib import Path

import pytest

from ..support.processes import PROMPTS, completion, launched, single_rank_texts, two_ranks_config


@pytest.mark.parametrize("strategy", ["pipeline", "tensor"])
def test_ranks_agree_on_float32_and_equal_one_rank(
    q4_checkpoint: Path, tmp_path: Path, strategy: str
) -> None:
    expected = single_rank_texts(tmp_path, q4_checkpoint)
    text = two_ranks_config(tmp_path, q4_checkpoint, f'strategy = "{strategy}"\n')
    with launched(tmp_path, text) as (url, process):
        assert [completion(url, p) for p in PROMPTS] == expected
    assert process.stdout is not None
    lines = [line for line in process.stdout.read().splitlines() if "computing in float32" in line]
    assert len(lines) == 2, lines
