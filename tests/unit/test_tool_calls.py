"""Tool-call formats: each family's parser, renderer, grammar and prompt rendering."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from mlx_lm.utils import load_tokenizer
from tokenizers import AddedToken

from mlxserve.plugins.chat_prompt import TemplateSupport, render_chat_prompt, render_chat_text
from mlxserve.plugins.family import ModelFamily
from mlxserve.plugins.testing import (
    SAMPLE_CALLS,
    SAMPLE_TOOLS,
    check_grammar,
    check_round_trip,
    parse_every_way,
)
from mlxserve.plugins.tool_calls import (
    HermesToolCalls,
    ParsedPiece,
    TextPiece,
    ToolCall,
    marker_token_ids,
)

from ..support import BUILTIN_FAMILIES

WEATHER = ToolCall("get_weather", '{"city": "Paris"}')
NOW = ToolCall("now", "{}")
T = TextPiece

DS_BEGIN, DS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
DS_CALL = "<｜tool▁call▁begin｜>function<｜tool▁sep｜>{}\n```json\n{}\n```<｜tool▁call▁end｜>"
DS_WEATHER = DS_CALL.format("get_weather", '{"city": "Paris"}')
DS_NOW = DS_CALL.format("now", "{}")

CASES: dict[str, list[tuple[str, list[ParsedPiece]]]] = {
    "qwen": [
        ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
         [WEATHER]),
        ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
         '</tool_call>\nand\n<tool_call>{"name": "now", "arguments": "{}"}</tool_call>\nDone.',
         [T("Let me check."), WEATHER, T("and"), NOW, T("Done.")]),
        ('<tool_call>{"name": "now", "arguments": {}}</tool_call><tool_call>{"name": "now"}'
         "</tool_call>\n", [NOW, NOW]),
    ],
    "llama": [
        ('{"name": "get_weather", "parameters": {"city": "Paris"}}', [WEATHER]),
        ('  \n<|python_tag|>{"name": "now", "arguments": {}}\n', [NOW]),
        ('{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "now", '
         '"parameters": {}}', [WEATHER, NOW]),
        ('{"name": "now", "parameters": {}}\n{"name": "now", "parameters": {}}', [NOW, NOW]),
        ('Checking. <|python_tag|>{"name": "now", "parameters": {}}', [T("Checking."), NOW]),
    ],
    "mistral": [
        ('[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]', [WEATHER]),
        ('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}, '
         '{"name": "now", "arguments": {}}]', [WEATHER, NOW]),
        ('[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]now[CALL_ID]a1b2c3d4e[ARGS]{}',
         [WEATHER, NOW]),
        ('Sure.\n[TOOL_CALLS][{"name": "now", "arguments": {}}]\nBye', [T("Sure."), NOW, T("Bye")]),
    ],
    "deepseek": [
        (f"{DS_BEGIN}{DS_WEATHER}{DS_END}", [WEATHER]),
        (f"Checking.\n\n{DS_BEGIN}{DS_WEATHER}\n{DS_NOW}{DS_END}\nDone.",
         [T("Checking."), WEATHER, NOW, T("Done.")]),
        (f"{DS_BEGIN}<｜tool▁call▁begin｜>now<｜tool▁sep｜>{{}}<｜tool▁call▁end｜>{DS_END}", [NOW]),
        (f"{DS_BEGIN}{DS_NOW}", [NOW]),
    ],
}  # fmt: skip

# Unfinished or malformed calls, and prose that mentions a marker: all of it is text.
TEXT_ONLY: dict[str, list[str]] = {
    "qwen": [
        'Sure <tool_call>\n{"name": "now", "argu',
        '<tool_call>{"name": now}</tool_call> ok',
        "Wrap calls in <tool_call> tags: <tool_call>like this</tool_call>.",
        "a < b and <tool_ is cut",
        "  trailing space and newline \n",
    ],
    "llama": [
        '{"answer": 42}',
        '{"name": "now", "parameters": {',
        '{"name": "now", "parameters": {}} and more',
        'Use {"name": "now"} to call it.',
        "[1, 2] are not calls",
    ],
    "mistral": [
        '[TOOL_CALLS][{"name": "now", "arguments": {}',
        '[TOOL_CALLS][{"nom": "now"}] after',
        "The [TOOL_CALLS] token starts calls.",
        "[TOOL_CALLS]now[ARGS]oops",
        "[TOOL_CALLS][]",
    ],
    "deepseek": [
        f"{DS_BEGIN}{DS_NOW}\n<｜tool▁call▁begin｜>func",
        f"{DS_BEGIN}{DS_CALL.format('now', '{oops}')}{DS_END} x",
        f"The marker {DS_BEGIN} opens calls.",
        f"{DS_BEGIN}{DS_END}",
    ],
}
for _name, _texts in TEXT_ONLY.items():
    CASES[_name] += [(text, [TextPiece(text)]) for text in _texts]


@pytest.mark.parametrize(
    ("family_name", "text", "expected"),
    [(name, text, expected) for name, cases in CASES.items() for text, expected in cases],
)
def test_parser_reads_the_family_format_however_it_streams(
    builtin_families: dict[str, ModelFamily],
    family_name: str,
    text: str,
    expected: list[ParsedPiece],
) -> None:
    fmt = builtin_families[family_name].tool_call_format
    assert fmt is not None
    pieces = parse_every_way(fmt, text)
    assert [_canonical(p) for p in pieces] == [_canonical(p) for p in expected]


def _canonical(piece: ParsedPiece) -> Any:
    return (piece.name, json.loads(piece.arguments)) if isinstance(piece, ToolCall) else piece


@pytest.mark.parametrize("family_name", BUILTIN_FAMILIES)
def test_render_calls_round_trips(
    builtin_families: dict[str, ModelFamily], family_name: str
) -> None:
    fmt = builtin_families[family_name].tool_call_format
    assert fmt is not None
    check_round_trip(fmt)


@pytest.mark.parametrize("family_name", BUILTIN_FAMILIES)
def test_grammar_walks_always_parse_into_valid_calls(
    builtin_families: dict[str, ModelFamily], tiny_checkpoints: dict[str, Path], family_name: str
) -> None:
    fmt = builtin_families[family_name].tool_call_format
    assert fmt is not None
    check_grammar(fmt, load_tokenizer(tiny_checkpoints[family_name]), walks=4)


@pytest.mark.parametrize("family_name", ["qwen", "mistral", "deepseek"])
def test_grammar_names_markers_that_are_tokens_of_the_checkpoint(
    builtin_families: dict[str, ModelFamily], tiny_checkpoints: dict[str, Path], family_name: str
) -> None:
    fmt = builtin_families[family_name].tool_call_format
    assert fmt is not None
    tokenizer = load_tokenizer(tiny_checkpoints[family_name])
    tokenizer._tokenizer.add_tokens([AddedToken(m, special=True) for m in fmt.markers])
    special = marker_token_ids(fmt, tokenizer)
    assert set(special) == set(fmt.markers)
    grammar = fmt.grammar(SAMPLE_TOOLS, parallel=True, special=special)
    assert all(f"<[{token}]>" in grammar for token in special.values()) or family_name == "mistral"
    assert f"<[{special[fmt.markers[0]]}]>" in grammar
    check_grammar(fmt, tokenizer, walks=2)


def test_grammar_needs_a_tool() -> None:
    with pytest.raises(ValueError, match="at least one tool"):
        HermesToolCalls().grammar([], parallel=False)


# ---- rendering the prompt -------------------------------------------------------------

ASSISTANT_CALLS = {
    "role": "assistant",
    "content": None,
    "tool_calls": [
        {"id": f"call_{i}", "type": "function", "function": vars(call)}
        for i, call in enumerate(SAMPLE_CALLS)
    ],
}
ROUND_TRIP = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris, and the time?"},
    ASSISTANT_CALLS,
    {"role": "tool", "tool_call_id": "call_0", "content": '{"temperature": 21}'},
    {"role": "tool", "tool_call_id": "call_1", "content": "12:00"},
    {"role": "assistant", "content": "21 degrees at noon."},
    {"role": "user", "content": "Thanks!"},
]


@pytest.mark.parametrize("family_name", BUILTIN_FAMILIES)
def test_a_tool_round_trip_renders_with_the_fallback_template(
    builtin_families: dict[str, ModelFamily], tiny_checkpoints: dict[str, Path], family_name: str
) -> None:
    family = builtin_families[family_name]
    fmt = family.tool_call_format
    assert fmt is not None
    tokenizer = load_tokenizer(tiny_checkpoints[family_name])
    text = render_chat_text(tokenizer, family, fmt, ROUND_TRIP, SAMPLE_TOOLS)
    assert fmt.tools_prompt(SAMPLE_TOOLS) in text
    assert "Be brief." in text
    assert fmt.render_calls(SAMPLE_CALLS) in text
    assert fmt.render_result("get_weather", '{"temperature": 21}') in text
    assert fmt.render_result("now", "12:00") in text
    ids = render_chat_prompt(tokenizer, family, fmt, ROUND_TRIP, SAMPLE_TOOLS)
    assert ids == list(tokenizer.encode(text, add_special_tokens=False))


@pytest.mark.parametrize("family_name", BUILTIN_FAMILIES)
def test_without_tools_the_prompt_is_the_plain_template(
    builtin_families: dict[str, ModelFamily], tiny_checkpoints: dict[str, Path], family_name: str
) -> None:
    family = builtin_families[family_name]
    tokenizer = load_tokenizer(tiny_checkpoints[family_name])
    messages = [{"role": "user", "content": "hi"}]
    plain = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    assert render_chat_prompt(tokenizer, family, family.tool_call_format, messages, []) == plain
    assert render_chat_prompt(tokenizer, family, None, messages, None) == plain


def test_a_family_without_a_format_cannot_take_tools(
    builtin_families: dict[str, ModelFamily], tiny_checkpoints: dict[str, Path]
) -> None:
    tokenizer = load_tokenizer(tiny_checkpoints["qwen"])
    with pytest.raises(ValueError, match="qwen family has no tool-call format"):
        render_chat_prompt(tokenizer, builtin_families["qwen"], None, ROUND_TRIP, SAMPLE_TOOLS)


TOOLS_TEMPLATE = """\
{%- if tools %}<tools>{% for t in tools %}{{ t.function.name }};{% endfor %}</tools>{% endif %}
{%- for m in messages %}[{{ m.role }}]{{ m.content or '' }}
{%- for c in m.tool_calls or [] %}<call {{ c.id }}>{{ c.function.name }}:
{%- if c.function.arguments is string %}STRING{% endif %}{{ c.function.arguments | tojson }}
{%- endfor %}{% if m.role == 'tool' %}<result {{ m.tool_call_id }} {{ m.name }}>{% endif %}
{%- endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"""

CALLS_ONLY_TEMPLATE = """\
{%- for m in messages %}[{{ m.role }}]{{ m.content or '' }}
{%- for c in m.tool_calls or [] %}<call>{{ c.function.name + ' ' + c.function.arguments }}
{%- endfor %}{% if m.role == 'tool' %}<result>{% endif %}{% endfor %}"""


def _with_template(checkpoint: Path, template: str) -> Any:
    tokenizer = load_tokenizer(checkpoint)
    tokenizer._tokenizer.chat_template = template
    return tokenizer


def test_a_template_that_knows_tools_renders_them_itself(
    builtin_families: dict[str, ModelFamily], tiny_checkpoints: dict[str, Path]
) -> None:
    family = builtin_families["qwen"]
    tokenizer = _with_template(tiny_checkpoints["qwen"], TOOLS_TEMPLATE)
    support = TemplateSupport.of(tokenizer)
    assert support == TemplateSupport(True, True, True, dict_arguments=True)
    text = render_chat_text(tokenizer, family, family.tool_call_format, ROUND_TRIP, SAMPLE_TOOLS)
    assert text.startswith("<tools>get_weather;now;</tools>[system]Be brief.")
    assert '<call call_0>get_weather:{"city": "Paris, \\"FR\\" 東京", "days": 3}' in text
    assert "STRING" not in text and "<tool_call>" not in text
    assert "[tool]12:00<result call_1 now>" in text


def test_a_template_that_knows_calls_but_not_tools_gets_the_tools_prompt(
    builtin_families: dict[str, ModelFamily], tiny_checkpoints: dict[str, Path]
) -> None:
    family = builtin_families["deepseek"]
    fmt = family.tool_call_format
    assert fmt is not None
    tokenizer = _with_template(tiny_checkpoints["deepseek"], CALLS_ONLY_TEMPLATE)
    assert TemplateSupport.of(tokenizer) == TemplateSupport(False, True, True, False)
    text = render_chat_text(tokenizer, family, fmt, ROUND_TRIP, SAMPLE_TOOLS)
    assert text.startswith(f"[system]Be brief.\n\n{fmt.tools_prompt(SAMPLE_TOOLS)}")
    assert "<call>now {}" in text and "[tool]12:00<result>" in text


def test_mistral_call_ids_become_nine_characters_in_the_prompt(
    builtin_families: dict[str, ModelFamily], tiny_checkpoints: dict[str, Path]
) -> None:
    family = builtin_families["mistral"]
    fmt = family.tool_call_format
    assert fmt is not None
    tokenizer = _with_template(tiny_checkpoints["mistral"], TOOLS_TEMPLATE)
    text = render_chat_text(tokenizer, family, fmt, ROUND_TRIP, SAMPLE_TOOLS)
    call_id = fmt.prompt_call_id("call_0")
    assert len(call_id) == 9 and call_id.isalnum() and fmt.prompt_call_id(call_id) == call_id
    assert f"<call {call_id}>get_weather" in text and f"<result {call_id} get_weather>" in text
