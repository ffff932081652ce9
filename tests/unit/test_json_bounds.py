"""Schemas rewritten so their JSON ends: closed tool schemas, no repeated or undeclared keys,
bounded strings, numbers, maps and json_object output (llguidance matchers, directly)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import llguidance
import llguidance.hf
import pytest
from mlx_lm.utils import load_tokenizer

from mlxserve.core.sampling.constraint import json_grammar
from mlxserve.core.sampling.json_bounds import (
    MAX_KEY_LENGTH,
    MAX_NESTING,
    MAX_OBJECT_KEYS,
    MAX_STRING_LENGTH,
    bounded_object_schema,
    bounded_tool_schema,
)
from mlxserve.plugins.testing import constrained_walk
from mlxserve.plugins.tool_calls import HermesToolCalls
from mlxserve.server.structured import bounded_tools, grammar_for_response_format

# LangChain's with_structured_output(Person) tool: no additionalProperties anywhere.
PERSON: dict[str, Any] = {
    "type": "object",
    "properties": {
        "type": {"type": "string", "description": "what the person is"},
        "age": {"type": "integer"},
        "height": {"type": "number"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {"type": "object", "properties": {"city": {"type": "string"}}},
        "meta": {"type": "object", "additionalProperties": True},
        "anything": {},
    },
    "required": ["type", "age"],
}


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoints: dict[str, Path]) -> Any:
    return load_tokenizer(tiny_checkpoints["qwen"])


def accepts(tokenizer: Any, grammar: str, text: str) -> bool:
    """Whether the grammar takes all of ``text`` and may end there."""
    ll = llguidance.hf.from_tokenizer(tokenizer._tokenizer)
    matcher = llguidance.LLMatcher(ll, grammar, log_level=0)
    assert not matcher.is_error(), matcher.get_error()
    return all(matcher.consume_token(t) for t in ll.tokenize_str(text)) and (matcher.is_accepting())


def tool_grammar(closed: bool = True) -> str:
    return json_grammar(bounded_tool_schema(PERSON, closed=closed))


def test_a_tool_schema_without_additional_properties_takes_its_declared_keys(tokenizer) -> None:
    grammar = tool_grammar()
    for text in (
        '{"type": "a", "age": 3}',
        '{"type": "a", "age": 3, "height": 1.5, "tags": ["x"], "address": {"city": "P"}}',
        '{"type": "a", "age": 3, "meta": {"k": [1, {"z": null}]}, "anything": "x"}',
    ):
        assert accepts(tokenizer, grammar, text), text


@pytest.mark.parametrize(
    "text",
    [
        '{"type": "a", "type": "b", "age": 3}',  # a repeated key
        '{"type": "a", "age": 3, "age": 4}',
        '{"type": "a", "age": 3, "color": "red"}',  # an undeclared key
        '{"type": "a", "age": 3, "address": {"city": "P", "zip": "1"}}',  # nested too
    ],
)
def test_a_closed_tool_schema_refuses_repeated_and_undeclared_keys(tokenizer, text: str) -> None:
    assert not accepts(tokenizer, tool_grammar(), text)


def test_open_tool_schemas_keep_other_keys(tokenizer) -> None:
    assert accepts(tokenizer, tool_grammar(closed=False), '{"type": "a", "age": 3, "color": 1}')
    assert not accepts(
        tokenizer, tool_grammar(closed=False), '{"type": "a", "type": "b", "age": 3}'
    )


def test_explicit_additional_properties_are_kept() -> None:
    schema = {
        "type": "object",
        "properties": {"a": {}},
        "additionalProperties": {"type": "integer"},
    }
    assert bounded_tool_schema(schema, closed=True)["additionalProperties"] == {
        "type": "integer",
        "minimum": -(10**15),
        "maximum": 10**15,
    }


@pytest.mark.parametrize(
    "text",
    [
        '{"type": "' + "x" * (MAX_STRING_LENGTH + 1) + '", "age": 3}',  # a string too long
        '{"type": "a", "age": ' + "9" * 17 + "}",  # a number with too many digits
        '{"type": "a", "age": 3, "height": 0.' + "1" * 7 + "}",  # too many decimals
        '{"type": "a", "age": 3, "meta": {"' + "k" * (MAX_KEY_LENGTH + 1) + '": 1}}',
    ],
)
def test_tool_arguments_are_bounded(tokenizer, text: str) -> None:
    assert not accepts(tokenizer, tool_grammar(), text)


def test_a_schema_with_its_own_bounds_keeps_them(tokenizer) -> None:
    schema = {"type": "object", "properties": {"s": {"type": "string", "maxLength": 9000}}}
    grammar = json_grammar(bounded_tool_schema(schema, closed=True))
    assert accepts(tokenizer, grammar, '{"s": "' + "x" * 8000 + '"}')


def test_a_tool_without_parameters_takes_no_arguments_when_closed(tokenizer) -> None:
    assert accepts(tokenizer, json_grammar(bounded_tool_schema(None, closed=True)), "{}")
    assert not accepts(tokenizer, json_grammar(bounded_tool_schema(None, closed=True)), '{"a": 1}')
    assert accepts(tokenizer, json_grammar(bounded_tool_schema(None, closed=False)), '{"a": 1}')


def test_the_forced_call_grammar_is_closed(tokenizer) -> None:
    tools = [{"type": "function", "function": {"name": "Person", "parameters": PERSON}}]
    grammar = HermesToolCalls().grammar(bounded_tools(tools, closed=True), parallel=False)
    call = '<tool_call>\n{{"name": "Person", "arguments": {}}}\n</tool_call>'
    assert accepts(tokenizer, grammar, call.format('{"type": "a", "age": 3}'))
    assert not accepts(tokenizer, grammar, call.format('{"type": "a", "age": 3, "x": 1}'))
    assert tools[0]["function"]["parameters"] is PERSON and "additionalProperties" not in PERSON


def _object(keys: int) -> str:
    return "{" + ", ".join(f'"k{i}": {i}' for i in range(keys)) + "}"


def test_json_object_output_is_any_object_but_bounded(tokenizer) -> None:
    grammar = grammar_for_response_format({"type": "json_object"})
    assert grammar is not None
    deep = "[" * (MAX_NESTING - 1) + "1" + "]" * (MAX_NESTING - 1)
    for text in ('{"a": 1, "b": [1, 2.5, "x"], "c": {"d": null}}', _object(MAX_OBJECT_KEYS)):
        assert accepts(tokenizer, grammar, text), text
    assert accepts(tokenizer, grammar, '{"a": ' + deep + "}")
    for text in (
        _object(MAX_OBJECT_KEYS + 1),
        '{"a": [' + deep + "]}",  # nested too deep
        '{"a": "' + "x" * (MAX_STRING_LENGTH + 1) + '"}',
        '{"' + "k" * (MAX_KEY_LENGTH + 1) + '": 1}',
        '{"a": ' + "1" * 17 + "}",
        "[1]",
    ):
        assert not accepts(tokenizer, grammar, text), text[:80]


def test_every_walk_through_json_object_ends(tokenizer) -> None:
    grammar = json_grammar(bounded_object_schema())
    for seed in range(3):
        assert isinstance(json.loads(constrained_walk(grammar, tokenizer, seed, 50_000)), dict)
