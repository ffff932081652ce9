"""Reasoning formats and thinking blocks without a server: the ``<think>`` parser however the
reply streams, the engine's thinking block (budget, forced end, the grammar that waits for
it), and a reply whose tool-call markup inside its reasoning is never parsed."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest

from mlxserve.core.engine.engine import RequestStream
from mlxserve.core.engine.sequence import RequestOutput, Usage
from mlxserve.core.sampling.params import SamplingParams
from mlxserve.core.sampling.thinking import Thinking
from mlxserve.plugins import ThinkTags
from mlxserve.plugins.reasoning import HarmonyChannels, ReasoningPiece, ReplyPiece
from mlxserve.plugins.tool_calls import HermesToolCalls, TextPiece
from mlxserve.server.conversation import (
    Conversation,
    Event,
    ReasoningDelta,
    Reply,
    TextDelta,
    ToolCallEvent,
)
from mlxserve.server.generation import Admitted

THINK = ThinkTags()

# (reply text, the prompt opened the block, reasoning, answer)
CANONICAL = [
    ("\nThe user greets.\n</think>\n\nHello!", True, "The user greets.\n", "Hello!"),
    (
        "<think>\nHmm, < and </ are not tags.</think>Paris",
        False,
        "Hmm, < and </ are not tags.",
        "Paris",
    ),
    ("  <think>a</think>  b </think> <think>c", False, "a", "b </think> <think>c"),
    ("All answer, no <think> here.", False, "", "All answer, no <think> here."),
    ("An unfinished thought </thi", True, "An unfinished thought </thi", ""),
    ("<thin", False, "", "<thin"),
    ("</think>The answer only.", True, "", "The answer only."),
    ("", True, "", ""),
]


def split(pieces: list[ReplyPiece]) -> tuple[str, str]:
    reasoning = "".join(p.text for p in pieces if isinstance(p, ReasoningPiece))
    answer = "".join(p.text for p in pieces if isinstance(p, TextPiece))
    return reasoning, answer


def parse(chunks: list[str], inside: bool) -> list[ReplyPiece]:
    parser = THINK.parser(inside=inside)
    pieces: list[ReplyPiece] = []
    for chunk in chunks:
        pieces += parser.feed(chunk)
    return pieces + parser.finish()


@pytest.mark.parametrize(("text", "inside", "reasoning", "answer"), CANONICAL)
def test_think_tags_split_a_reply_however_it_streams(
    text: str, inside: bool, reasoning: str, answer: str
) -> None:
    assert split(parse([text], inside)) == (reasoning, answer)
    assert split(parse(list(text), inside)) == (reasoning, answer)
    for cut in range(len(text) + 1):
        for second in range(cut, len(text) + 1):
            chunks = [text[:cut], text[cut:second], text[second:]]
            assert split(parse(chunks, inside)) == (reasoning, answer), chunks


def test_no_tag_leaks_and_only_a_tag_prefix_waits() -> None:
    parser = THINK.parser(inside=True)
    assert parser.feed("step one </th") == [ReasoningPiece("step one ")]
    assert parser.feed("ink>\n\nYes") == [TextPiece("Yes")]
    parser = THINK.parser(inside=False)
    assert parser.feed("<th") == []  # may still open the block
    assert parser.feed("ink>x") == [ReasoningPiece("x")]
    assert THINK.parser(inside=False).feed("No") == [TextPiece("No")]


def test_think_tags_see_a_prompt_that_opens_the_block() -> None:
    assert THINK.opens_in("<|im_start|>assistant\n<think>\n")
    assert not THINK.opens_in("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not THINK.opens_in("<|im_start|>assistant\n")


# ---- the engine's thinking block ------------------------------------------------------

END = (7, 8)  # "</think>" as two tokens
EOS = frozenset({0})


def run(thinking: Thinking, sampled: list[int]) -> list[int]:
    out = []
    for token in sampled:
        chosen = thinking.choose(token, EOS)
        thinking.see(chosen)
        out.append(chosen)
    return out


def test_a_budget_forces_the_end_marker_then_the_answer_goes_on() -> None:
    thinking = Thinking(END, budget=3)
    assert run(thinking, [5, 5, 5, 5, 5, 5, 5]) == [5, 5, 5, 7, 8, 5, 5]
    assert not thinking.inside and thinking.spent == 3


def test_a_marker_the_model_began_is_finished_not_repeated() -> None:
    thinking = Thinking(END, budget=3)
    assert run(thinking, [5, 5, 7, 5, 5]) == [5, 5, 7, 8, 5]
    assert not thinking.inside


def test_the_model_may_end_its_thinking_itself() -> None:
    thinking = Thinking(END, budget=10)
    assert run(thinking, [5, 7, 8, 5, 0]) == [5, 7, 8, 5, 0]
    assert thinking.spent == 1


def test_the_grammar_waits_for_the_end_and_an_owed_answer_is_not_skipped() -> None:
    grammar = SimpleNamespace(name="the grammar")
    thinking = Thinking(END, grammar=grammar)  # type: ignore[arg-type]
    handed = []
    for token in [5, 0, 0, 5]:  # end-of-sequence while the answer is owed closes the block
        chosen = thinking.choose(token, EOS)
        handed.append((chosen, thinking.see(chosen)))
    assert handed == [(5, None), (7, None), (8, grammar), (5, None)]


# ---- a reply: tool calls are read in the answer only ---------------------------------------


def reply_events(text_pieces: list[str], inside: bool) -> list[Event]:
    async def events() -> list[Event]:
        stream = RequestStream("r", asyncio.get_running_loop())
        for i, text in enumerate(text_pieces):
            last = i == len(text_pieces) - 1
            usage = Usage(prompt_tokens=3, completion_tokens=i + 1) if last else None
            stream.put(
                RequestOutput("r", text=text, finish_reason="stop" if last else None, usage=usage)
            )
        admitted = Admitted(
            "m", SimpleNamespace(name="m"), stream, SamplingParams(), time.monotonic() + 30
        )
        never = asyncio.Event()

        async def receive() -> dict[str, str]:
            await never.wait()
            return {"type": "http.disconnect"}

        tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
        conversation = Conversation([{"role": "user", "content": "hi"}], tools)
        reply = Reply(
            admitted,
            conversation,
            HermesToolCalls().parser(),
            SimpleNamespace(receive=receive),
            THINK.parser(inside=inside),
        )
        engine = SimpleNamespace(abort=lambda request_id: None, shutting_down=False, error=None)
        return [event async for event in reply.events(engine)]

    return asyncio.run(events())


def test_tool_call_markup_inside_the_thinking_is_not_parsed() -> None:
    call = '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>'
    text = f"I could write {call} here.</think>\n{call}"
    for pieces in ([text], list(text)):
        events = reply_events(pieces, inside=True)
        reasoning = "".join(e.text for e in events if isinstance(e, ReasoningDelta))
        calls = [e for e in events if isinstance(e, ToolCallEvent)]
        assert reasoning == f"I could write {call} here."
        assert [(c.name, c.arguments) for c in calls] == [("f", '{"x": 1}')]
        assert not "".join(e.text for e in events if isinstance(e, TextDelta)).strip()


HARMONY = HarmonyChannels()
HEADER = "<|end|><|start|>assistant<|channel|>final<|message|>"
# (reply text, the prompt opened the analysis channel, reasoning, answer)
HARMONY_CANONICAL = [
    (
        f"<|channel|>analysis<|message|>Think about it.{HEADER}Paris.",
        False,
        "Think about it.",
        "Paris.",
    ),
    (f"Think.{HEADER}Answer", True, "Think.", "Answer"),
    ("<|channel|>final<|message|>Just the answer.", False, "", "Just the answer."),
    ("No header at all <|chan", False, "", "No header at all <|chan"),
    ("<|channel|>analysis<|message|>unfinished <|en", False, "unfinished <|en", ""),
    (
        "<|start|>assistant<|channel|>analysis<|message|>a<|end|>"
        "<|start|>assistant<|channel|>commentary<|message|>b<|end|>"
        "<|start|>assistant<|channel|>final<|message|>c",
        False,
        "a",
        "bc",
    ),
    ("", True, "", ""),
]


@pytest.mark.parametrize(("text", "inside", "reasoning", "answer"), HARMONY_CANONICAL)
def test_harmony_channels_split_a_reply_however_it_streams(
    text: str, inside: bool, reasoning: str, answer: str
) -> None:
    def parse_harmony(chunks: list[str]) -> tuple[str, str]:
        parser = HARMONY.parser(inside=inside)
        pieces: list[ReplyPiece] = []
        for chunk in chunks:
            pieces += parser.feed(chunk)
        return split(pieces + parser.finish())

    assert parse_harmony([text]) == (reasoning, answer)
    assert parse_harmony(list(text)) == (reasoning, answer)
    for cut in range(len(text) + 1):
        for second in range(cut, len(text) + 1):
            chunks = [text[:cut], text[cut:second], text[second:]]
            assert parse_harmony(chunks) == (reasoning, answer), chunks


def test_harmony_sees_a_prompt_that_opens_the_analysis_channel() -> None:
    assert HARMONY.opens_in("<|start|>assistant<|channel|>analysis<|message|>")
    assert not HARMONY.opens_in("<|start|>user<|message|>hi<|end|><|start|>assistant")
    assert HARMONY.end.endswith("<|channel|>final<|message|>")
