"""Chat prompts with tools: calls and results through the chat template, or the family's format.

The checkpoint's chat template renders whatever it knows (tools, assistant tool calls, a tool
role); what it does not, the family's :class:`~.tool_calls.ToolCallFormat` writes in.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mlxserve.plugins.tool_calls import ToolCall, ToolCallFormat, arguments_value, dumps

if TYPE_CHECKING:
    from mlxserve.plugins.family import ModelFamily

DICT_ARGUMENTS = re.compile(
    r"arguments\s*(\|\s*(tojson|items)|is\s+(not\s+)?(string|mapping)|\.items\(\))"
)


@dataclass(frozen=True)
class TemplateSupport:
    """What a chat template renders itself; the rest comes from the tool-call format."""

    tools: bool
    tool_calls: bool
    tool_role: bool
    dict_arguments: bool

    @classmethod
    def of(cls, tokenizer: Any) -> TemplateSupport:
        hf = getattr(tokenizer, "_tokenizer", tokenizer)
        template = getattr(hf, "chat_template", None) or ""
        source = "\n".join(template.values()) if isinstance(template, dict) else template
        return cls(
            tools=re.search(r"\btools\b", source) is not None,
            tool_calls="tool_calls" in source,
            tool_role=re.search(r"""["']tool["']""", source) is not None,
            dict_arguments=DICT_ARGUMENTS.search(source) is not None,
        )


def _calls_of(message: Mapping[str, Any]) -> list[ToolCall]:
    calls = []
    for call in message.get("tool_calls") or ():
        function = call["function"]
        arguments = function.get("arguments", "{}")
        text = arguments if isinstance(arguments, str) else dumps(arguments)
        calls.append(ToolCall(function["name"], text))
    return calls


def _template_calls(
    message: Mapping[str, Any], fmt: ToolCallFormat, support: TemplateSupport
) -> list[dict[str, Any]]:
    calls = []
    for call, parsed in zip(message["tool_calls"], _calls_of(message), strict=True):
        arguments: Any = parsed.arguments
        if support.dict_arguments:
            arguments = arguments_value(parsed)
        function = {"name": parsed.name, "arguments": arguments}
        call_id = fmt.prompt_call_id(call.get("id") or "")
        calls.append({"id": call_id, "type": "function", "function": function})
    return calls


def chat_messages(
    fmt: ToolCallFormat, messages: list[dict[str, Any]], support: TemplateSupport
) -> list[dict[str, Any]]:
    """The messages as the chat template takes them; the format writes what it cannot."""
    names: dict[str, str] = {}
    out: list[dict[str, Any]] = []
    results: dict[str, Any] | None = None
    for message in messages:
        if message.get("role") == "assistant" and message.get("tool_calls"):
            names |= {c.get("id") or "": c["function"]["name"] for c in message["tool_calls"]}
            if support.tool_calls:
                out.append({**message, "tool_calls": _template_calls(message, fmt, support)})
            else:
                parts = (message.get("content"), fmt.render_calls(_calls_of(message)))
                out.append({"role": "assistant", "content": "\n".join(p for p in parts if p)})
        elif message.get("role") == "tool":
            call_id = message.get("tool_call_id") or ""
            name = message.get("name") or names.get(call_id)
            if support.tool_role:
                named = {"name": name} if name else {}
                out.append({**message, **named, "tool_call_id": fmt.prompt_call_id(call_id)})
                continue
            text = fmt.render_result(name, message.get("content") or "")
            if out and out[-1] is results:
                results["content"] += "\n" + text
            else:
                results = {"role": "user", "content": text}
                out.append(results)
        else:
            out.append(dict(message))
    return out


def _with_tools_prompt(
    messages: list[dict[str, Any]], prompt: str, *, as_system: bool
) -> list[dict[str, Any]]:
    first = messages[0] if messages else {}
    if first.get("role") == "system":
        content = "\n\n".join(p for p in (first.get("content"), prompt) if p)
        return [{**first, "content": content}, *messages[1:]]
    users = [i for i, m in enumerate(messages) if m.get("role") == "user"]
    if as_system or not users:
        return [{"role": "system", "content": prompt}, *messages]
    i = users[0]
    content = "\n\n".join(p for p in (prompt, messages[i].get("content")) if p)
    return [*messages[:i], {**messages[i], "content": content}, *messages[i + 1 :]]


def _uses_tools(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> bool:
    return bool(tools) or any(m.get("role") == "tool" or m.get("tool_calls") for m in messages)


def merged_system(messages: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """The messages with every system turn merged into one at the top (in order, blank-line
    separated), for a chat template that only takes a leading one; None when no system turn
    stands after the first message (nothing to merge)."""
    later = [m for m in messages[1:] if m.get("role") == "system"]
    if not later:
        return None
    systems = [m for m in messages if m.get("role") == "system"]
    content = "\n\n".join(str(m.get("content") or "") for m in systems)
    rest = [m for m in messages if m.get("role") != "system"]
    return [{**systems[0], "content": content}, *rest]


def _render(
    tokenizer: Any,
    family: ModelFamily | None,
    fmt: ToolCallFormat | None,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    tokenize: bool,
    template_kwargs: Mapping[str, Any] | None = None,
) -> Any:
    """System turns where they stand when the chat template takes them; when it raises and
    some stand after the first message, once more with them merged into the top one."""
    try:
        return _apply_chat_template(
            tokenizer, family, fmt, messages, tools, tokenize, template_kwargs
        )
    except Exception:
        merged = merged_system(messages)
        if merged is None:
            raise
    return _apply_chat_template(tokenizer, family, fmt, merged, tools, tokenize, template_kwargs)


def _apply_chat_template(
    tokenizer: Any,
    family: ModelFamily | None,
    fmt: ToolCallFormat | None,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    tokenize: bool,
    template_kwargs: Mapping[str, Any] | None = None,
) -> Any:
    extra = dict(template_kwargs or {})
    if not _uses_tools(messages, tools):
        return tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=tokenize, **extra
        )
    if fmt is None:
        owner = f"the {family.name} family" if family is not None else "this model"
        raise ValueError(f"{owner} has no tool-call format, so it cannot use tools")
    support = TemplateSupport.of(tokenizer)
    prepared = chat_messages(fmt, messages, support)
    kwargs = {**extra, "tools": tools} if tools and support.tools else extra
    attempts = [prepared]
    if tools and not support.tools:
        prompt = fmt.tools_prompt(tools)
        attempts = [
            _with_tools_prompt(prepared, prompt, as_system=True),
            _with_tools_prompt(prepared, prompt, as_system=False),
        ]
    for attempt in attempts[:-1]:
        try:  # a template that refuses a system turn gets the tools in the first user turn
            return tokenizer.apply_chat_template(
                attempt, add_generation_prompt=True, tokenize=tokenize, **kwargs
            )
        except Exception:  # noqa: BLE001, S112 - Jinja raises its own errors for a bad turn
            continue
    return tokenizer.apply_chat_template(
        attempts[-1], add_generation_prompt=True, tokenize=tokenize, **kwargs
    )


def render_chat_prompt(
    tokenizer: Any,
    family: ModelFamily | None,
    fmt: ToolCallFormat | None,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
    template_kwargs: Mapping[str, Any] | None = None,
) -> list[int]:
    """Prompt token ids for OpenAI-shaped chat ``messages`` and function ``tools``.

    The checkpoint's chat template renders what it can (the ``tools`` list, assistant
    ``tool_calls``, ``tool`` turns); ``fmt`` writes the rest: the tools into the system
    turn, calls as the model writes them, results as user turns. Without tools and tool
    turns this is plain ``apply_chat_template``. System turns after the first message stay
    where they stand, unless the template raises on them: then they are merged into the
    top system turn (:func:`merged_system`).

    Args:
        tokenizer: mlx-lm's TokenizerWrapper (or a Hugging Face tokenizer).
        family: the model's family, named in errors.
        fmt: its tool-call format (from the ``mlxserve_tool_call_format`` hook), or None.
        messages: dicts with role, content and, where they apply, tool_calls
            (arguments as JSON text), tool_call_id and name.
        tools: OpenAI function tools, or None.
        template_kwargs: extra variables for the template's render (``enable_thinking``...).

    Raises:
        ValueError: tools or tool turns for a family with no tool-call format.
        Exception: whatever the chat template raises for messages it rejects.
    """
    return list(
        _render(
            tokenizer, family, fmt, messages, tools, tokenize=True, template_kwargs=template_kwargs
        )
    )


def render_chat_text(
    tokenizer: Any,
    family: ModelFamily | None,
    fmt: ToolCallFormat | None,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
    template_kwargs: Mapping[str, Any] | None = None,
) -> str:
    """:func:`render_chat_prompt` as text, before tokenizing."""
    return _render(
        tokenizer, family, fmt, messages, tools, tokenize=False, template_kwargs=template_kwargs
    )
