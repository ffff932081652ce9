"""Speculative decoding's parts: prompt lookup, how long a draft pays, its plan on the wire,
its configuration."""

from __future__ import annotations

import pytest

from mlxserve.core.config.schema import ConfigError
from mlxserve.core.engine.plan import StepPlan
from mlxserve.core.engine.runner import sample_rows
from mlxserve.core.speculative.ngram import NgramIndex
from mlxserve.core.speculative.policy import Acceptance, StepCost, longest_draft

from ..support.server import write_config


def test_prompt_lookup_continues_the_latest_longest_match() -> None:
    index = NgramIndex(2, 4)
    index.extend([1, 2, 3, 4, 5, 1, 2, 3])
    assert index.propose(4) == [4, 5, 1, 2]
    index.extend([9])
    assert index.propose(3) == []  # (3, 9) and (2, 3, 9) never occurred before
    index.extend([1, 2])
    assert index.propose(3) == [3, 9, 1]  # the latest (1, 2), not the first
    index.extend([7, 1, 2, 3, 9])
    assert index.propose(2) == [1, 2]  # the longest match, (1, 2, 3, 9), wins over (2, 3)...
    assert NgramIndex(2, 4).propose(4) == []


def test_a_draft_is_as_long_as_it_pays() -> None:
    flat = StepCost()  # every size costs the same: draft all there is
    assert longest_draft([0.5, 0.9], [4, 2], flat) == 4
    assert longest_draft([0.9], [0], flat) == 0
    linear = StepCost([(1, 1.0), (64, 64.0)])  # compute-bound: nothing comes for free
    assert longest_draft([0.9] * 8, [4] * 8, linear) == 0
    cheap = StepCost([(1, 1.0), (8, 1.1), (16, 1.3), (64, 4.0)])
    assert longest_draft([0.9], [6], cheap) >= 4
    assert longest_draft([0.05], [6], cheap) <= 1  # rarely accepted: hardly worth it
    assert longest_draft([0.9] * 8, [6] * 8, cheap) < longest_draft([0.9], [6], cheap)
    draft_model = StepCost([(1, 0.5), (64, 0.6)])  # each drafted token costs a draft step
    assert longest_draft([0.6], [6], cheap, draft_model) < longest_draft([0.6], [6], cheap)


def test_acceptance_follows_what_verification_kept() -> None:
    acceptance = Acceptance()
    assert acceptance.rate == 0.5
    for _ in range(5):
        acceptance.update(drafted=4, accepted=4)
    high = acceptance.rate
    for _ in range(10):
        acceptance.update(drafted=4, accepted=0)
    assert high > 0.8 and acceptance.rate < 0.3


def test_proposals_are_checked_whether_drafted_or_not() -> None:
    """A sequence that stopped drafting keeps learning from what it would have drafted."""
    acceptance, output = Acceptance(), [1, 2]
    acceptance.proposed([3, 4, 5], output)
    assert acceptance.rate == 0.5  # nothing to check yet
    output.append(3)  # one token came (a plain step): the first proposed token came true
    acceptance.proposed([4, 5], output)
    assert (acceptance.accepted, acceptance.rejected) == (1, 0)
    output += [4, 9]  # a step that took a drafted token, then another: one true, one not
    acceptance.proposed([1], output)
    assert (acceptance.accepted, acceptance.rejected) == (0.7 + 1, 1)


def test_drafts_and_rewinds_survive_the_wire() -> None:
    plan = StepPlan(
        decode_ids=("a", "b", "c"),
        decode_tokens=(1, 2, 3),
        decode_drafts=((4, 5), (), (6,)),
        rewind=(("a", 2), ("c", 1)),
    )
    assert StepPlan.decode(plan.encode()) == plan
    assert plan.draft_width == 2
    assert sample_rows(plan) == [(0, 3), (3, 1), (4, 2)]


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('method = "draft"', "method 'draft' needs draft_model"),
        ('method = "ngram"\ndraft_model = "m"', "draft_model is for method 'draft'"),
        ('method = "ngram"\nngram_min = 5', "ngram_min (5) must be at most ngram_max (4)"),
        ('method = "ngram"\nnum_draft_tokens = 17', "must be between 1 and 16"),
        ('method = "draft"\ndraft_model = "nope"', "'nope' is not a model name or alias"),
        ('method = "draft"\ndraft_model = "m"', "a model cannot be its own draft model"),
        ('method = "guess"', "models.m.speculative.method"),
    ],
)
def test_speculative_settings_are_checked(tmp_path, table: str, message: str) -> None:  # noqa: ANN001
    models = '[registry]\ndefault_model = "m"\n[models.m]\nsource = "/x"\n'
    text = f"{models}[models.m.speculative]\n{table}\n"
    with pytest.raises(ConfigError) as error:
        write_config(tmp_path, text)
    assert message in str(error.value)
    assert "models.m.speculative" in str(error.value)
