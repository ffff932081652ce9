"""Reasoning in the open, end to end: a tiny Qwen checkpoint whose chat template opens
``<think>\n`` in the generation prompt (as Qwen3's does), served on loopback and asked through
the official openai and anthropic clients.

Its weights are random, so its words are gibberish (greedy, it repeats one token), but the
structure is certain: the prompt opens the thinking block, so every generated token is
reasoning until ``</think>``. Requests that must not see the model end its thinking ban
``</think>`` and the end-of-turn tokens with ``logit_bias``; the thinking is checked against
the same prompt's first tokens, taken from ``/v1/completions`` (which parses nothing).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import openai
import pytest
from mlx_lm.utils import load_tokenizer

from mlxserve.plugins.chat_prompt import render_chat_prompt
from mlxserve.plugins.families.qwen import Qwen
from mlxserve.plugins.tiny import write_tiny_checkpoint

from ..support.server import RunningServer, post, running_server, write_config

TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n"
    "{% else %}<think>\n{% endif %}{% endif %}"
)
ASK = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = {"temperature": 0}
SEED = 3  # weights whose greedy words are neither blank nor an early end of turn


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("thinker") / "qwen-thinker"
    return write_tiny_checkpoint(
        Qwen(), dest, seed=SEED, chat_template=TEMPLATE, extra_tokens=("<think>", "</think>")
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, checkpoint: Path) -> Iterator[RunningServer]:
    tmp = tmp_path_factory.mktemp("reasoning")
    config = write_config(
        tmp,
        f'[registry]\ndefault_model = "thinker"\ncache_dir = "{tmp / "cache"}"\n'
        f'[models.thinker]\nsource = "{checkpoint}"\n'
        "[kv_cache]\nmax_sequence_length = 1024\n",
    )
    with running_server(config) as running:
        yield running


@pytest.fixture(scope="module")
def tokenizer(checkpoint: Path):  # noqa: ANN201
    return load_tokenizer(checkpoint)


@pytest.fixture(scope="module")
def chat(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def claude(server: RunningServer) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        base_url=server.url, api_key="unused", max_retries=0, _strict_response_validation=True
    )


def token(tokenizer, text: str) -> int:  # noqa: ANN001
    return tokenizer.get_vocab()[text]


def never_ends_thinking(tokenizer) -> dict[str, int]:  # noqa: ANN001
    banned = [token(tokenizer, t) for t in ("</think>", "<|im_end|>", "<|endoftext|>")]
    return {str(t): -100 for t in banned}


def prompt_ids(tokenizer, tools: list | None = None, **kwargs: object) -> list[int]:  # noqa: ANN001
    """The prompt the server renders for ``ASK`` (with OpenAI function ``tools``)."""
    family = Qwen()
    fmt = family.tool_call_format
    return render_chat_prompt(tokenizer, family, fmt, ASK, tools, template_kwargs=kwargs)


def first_tokens(server: RunningServer, ids: list[int], n: int) -> str:
    """The text of the first ``n`` greedy tokens after the prompt ``ids``, unparsed."""
    body = {"model": "thinker", "prompt": ids, "max_tokens": n, "temperature": 0}
    response = post(server, "/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


# ---- chat completions ---------------------------------------------------------------------


def test_chat_text_before_the_end_of_thinking_is_reasoning_content(
    chat: openai.OpenAI, server: RunningServer, tokenizer
) -> None:
    bias = never_ends_thinking(tokenizer)
    reply = chat.chat.completions.create(
        model="thinker", messages=ASK, max_tokens=12, logit_bias=bias, **GREEDY
    )
    message = reply.choices[0].message
    assert message.reasoning_content and not message.content
    assert message.reasoning_content == first_tokens(server, prompt_ids(tokenizer), 12).lstrip()
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage and reply.usage.completion_tokens_details
    assert reply.usage.completion_tokens_details.reasoning_tokens == 12  # all of them

    stream = chat.chat.completions.create(
        model="thinker", messages=ASK, max_tokens=12, logit_bias=bias, stream=True, **GREEDY
    )
    deltas = [chunk.choices[0].delta for chunk in stream if chunk.choices]
    assert not "".join(d.content or "" for d in deltas)
    streamed = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
    assert streamed == message.reasoning_content


def test_chat_template_kwargs_reach_the_template(
    chat: openai.OpenAI, server: RunningServer, tokenizer
) -> None:
    def ask(**extra: object) -> object:
        return chat.chat.completions.create(
            model="thinker", messages=ASK, max_tokens=8, extra_body=extra, **GREEDY
        )

    thinking, plain = ask(), ask(chat_template_kwargs={"enable_thinking": False})
    closed = prompt_ids(tokenizer, enable_thinking=False)
    assert closed[-4:] != prompt_ids(tokenizer)[-4:]  # the template's other branch
    assert (thinking.usage.prompt_tokens, plain.usage.prompt_tokens) == (
        len(prompt_ids(tokenizer)),
        len(closed),
    )
    # the template closed the block: nothing is reasoning unless the model opens one itself
    assert getattr(plain.choices[0].message, "reasoning_content", None) is None
    assert plain.choices[0].message.content == first_tokens(server, closed, 8)
    # reasoning_effort "none" turns thinking off the same way
    effort = chat.chat.completions.create(
        model="thinker", messages=ASK, max_tokens=8, reasoning_effort="none", **GREEDY
    )
    assert effort.usage.prompt_tokens == plain.usage.prompt_tokens
    assert effort.choices[0].message.content == plain.choices[0].message.content


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("chat_template_kwargs", [1, 2], "valid dictionary"),
        ("chat_template_kwargs", {"add_generation_prompt": False}, "set by the server"),
        ("chat_template_kwargs", {"not a name": 1}, "template variable names"),
        ("chat_template_kwargs", {f"k{i}": i for i in range(65)}, "at most 64"),
        ("chat_template_kwargs", {"big": "x" * 70_000}, "at most 65536 characters"),
        ("reasoning_effort", "extreme", "reasoning_effort"),
    ],
)
def test_bad_reasoning_switches_are_400s_naming_the_field(
    server: RunningServer, field: str, value: object, problem: str
) -> None:
    body = {"model": "thinker", "messages": ASK, "max_tokens": 2, field: value}
    response = post(server, "/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"].startswith(field) and problem in error["message"]


def test_a_json_schema_applies_after_the_thinking(
    chat: openai.OpenAI, server: RunningServer, tokenizer
) -> None:
    """The thinking is free text; the grammar starts after ``</think>``: here the model's
    end of turn while an answer is owed ends the thinking instead of the reply."""
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 8}},
        "required": ["city"],
        "additionalProperties": False,
    }
    bias = {str(token(tokenizer, "</think>")): -100}  # the model never ends it itself
    stop = {str(token(tokenizer, t)): 100 for t in ("<|im_end|>",)}  # but wants to stop at once
    reply = chat.chat.completions.create(
        model="thinker",
        messages=ASK,
        max_tokens=64,
        logit_bias=bias | stop,
        response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}},
        **GREEDY,
    )
    message = reply.choices[0].message
    assert getattr(message, "reasoning_content", None) is None  # ended before any thought
    assert set(json.loads(message.content)) == {"city"}
    assert reply.choices[0].finish_reason == "stop"


# ---- the Responses API -------------------------------------------------------------------


def test_responses_put_a_reasoning_item_before_the_message(
    chat: openai.OpenAI, server: RunningServer, tokenizer
) -> None:
    response = chat.responses.create(
        model="thinker", input=ASK, max_output_tokens=10, reasoning={"effort": "high"}, **GREEDY
    )
    kinds = [item.type for item in response.output]
    assert kinds[0] == "reasoning" and set(kinds[1:]) <= {"message"}
    reasoning = response.output[0]
    thought = reasoning.content[0].text
    assert reasoning.content[0].type == "reasoning_text" and reasoning.summary == []
    assert response.reasoning.effort == "high"
    raw = first_tokens(server, prompt_ids(tokenizer, reasoning_effort="high"), 10)
    assert raw.lstrip().startswith(thought) and thought
    answer = "".join(part.text for item in response.output[1:] for part in item.content)
    assert thought not in answer or not answer
    assert response.usage is not None
    spent = response.usage.output_tokens_details.reasoning_tokens
    assert 0 < spent <= response.usage.output_tokens

    events = list(
        chat.responses.create(
            model="thinker",
            input=ASK,
            max_output_tokens=10,
            reasoning={"effort": "high"},
            stream=True,
            **GREEDY,
        )
    )
    types = [event.type for event in events]
    assert "response.reasoning_text.delta" in types and "response.reasoning_text.done" in types
    deltas = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    assert deltas == thought
    final = events[-1].response
    assert final.output[0].type == "reasoning" and final.output[0].content[0].text == thought


def test_responses_take_back_their_reasoning_items(chat: openai.OpenAI) -> None:
    first = chat.responses.create(model="thinker", input=ASK, max_output_tokens=6, **GREEDY)
    again = chat.responses.create(
        model="thinker",
        input=[
            *ASK,
            *[item.model_dump() for item in first.output],
            {"role": "user", "content": "Why?"},
        ],
        max_output_tokens=4,
        **GREEDY,
    )
    assert again.status in ("completed", "incomplete")


# ---- the Messages API ---------------------------------------------------------------------


def test_thinking_blocks_come_before_the_text(
    claude: anthropic.Anthropic, server: RunningServer, tokenizer
) -> None:
    message = claude.messages.create(
        model="thinker", messages=ASK, max_tokens=12, extra_body=GREEDY
    )
    assert message.content and message.content[0].type == "thinking"
    assert message.content[0].signature == ""
    assert [b.type for b in message.content[1:]] in ([], ["text"])
    assert (
        first_tokens(server, prompt_ids(tokenizer), 12)
        .lstrip()
        .startswith(message.content[0].thinking)
    )


def test_a_thinking_budget_ends_the_thinking_and_the_answer_goes_on(
    claude: anthropic.Anthropic, server: RunningServer, tokenizer
) -> None:
    budget = 4
    thinking = {"type": "enabled", "budget_tokens": budget}
    message = claude.messages.create(
        model="thinker", messages=ASK, max_tokens=16, thinking=thinking, extra_body=GREEDY
    )
    assert [b.type for b in message.content] == ["thinking", "text"]
    # the thinking is the model's own first `budget` tokens, then </think> was forced
    assert (
        message.content[0].thinking == first_tokens(server, prompt_ids(tokenizer), budget).lstrip()
    )
    assert message.content[1].text

    with claude.messages.stream(
        model="thinker", messages=ASK, max_tokens=16, thinking=thinking, extra_body=GREEDY
    ) as stream:
        events = list(stream)
        final = stream.get_final_message()
    assert final.model_dump()["content"] == message.model_dump()["content"]
    starts = [e.content_block.type for e in events if e.type == "content_block_start"]
    assert starts == ["thinking", "text"]
    deltas = [e.delta.type for e in events if e.type == "content_block_delta"]
    assert "thinking_delta" in deltas and "signature_delta" in deltas


def test_a_forced_tool_call_follows_free_thinking(
    claude: anthropic.Anthropic, server: RunningServer, tokenizer
) -> None:
    tool = {
        "name": "capital",
        "description": "The capital of a country.",
        "input_schema": {
            "type": "object",
            "properties": {"country": {"type": "string", "maxLength": 10}},
            "required": ["country"],
            "additionalProperties": False,
        },
    }
    message = claude.messages.create(
        model="thinker",
        messages=ASK,
        max_tokens=120,
        tools=[tool],
        tool_choice={"type": "any"},
        thinking={"type": "enabled", "budget_tokens": 3},
        extra_body=GREEDY,
    )
    kinds = [b.type for b in message.content]
    assert kinds == ["thinking", "tool_use"] and message.stop_reason == "tool_use"
    function = {"name": tool["name"], "description": tool["description"]}
    function["parameters"] = tool["input_schema"]
    ids = prompt_ids(tokenizer, [{"type": "function", "function": function}])
    assert message.content[0].thinking == first_tokens(server, ids, 3).lstrip()
    assert set(message.content[1].input) == {"country"}


def test_thinking_disabled_reaches_the_template(claude: anthropic.Anthropic, tokenizer) -> None:
    on = claude.messages.create(model="thinker", messages=ASK, max_tokens=4, extra_body=GREEDY)
    off = claude.messages.create(
        model="thinker",
        messages=ASK,
        max_tokens=4,
        thinking={"type": "disabled"},
        extra_body=GREEDY,
    )
    assert on.usage.input_tokens == len(prompt_ids(tokenizer))
    assert off.usage.input_tokens == len(prompt_ids(tokenizer, enable_thinking=False))
    assert all(block.type != "thinking" for block in off.content)


@pytest.mark.parametrize(
    ("thinking", "problem"),
    [
        ({"type": "enabled"}, "needs it"),
        ({"type": "enabled", "budget_tokens": 16}, "less than max_tokens"),
        ({"type": "enabled", "budget_tokens": 0}, "greater than or equal to 1"),
        ({"type": "sometimes"}, "thinking.type"),
    ],
)
def test_bad_thinking_is_a_400(server: RunningServer, thinking: dict, problem: str) -> None:
    body = {"model": "thinker", "messages": ASK, "max_tokens": 16, "thinking": thinking}
    response = httpx.post(server.url + "/v1/messages", json=body, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and problem in error["message"]
