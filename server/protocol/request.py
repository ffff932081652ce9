"""What every API's request turns itself into, whatever its wire shape: its input (a
:class:`Conversation`, or a :class:`RawPrompt` for text completions) and the sampling it asked
for (:class:`RequestedSampling`). The shared pipeline (``server.conversation.start``) takes
these two; nothing after it knows which API a request came from.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from mlxserve.core.sampling.params import (
    DEFAULTABLE_PARAMS,
    InvalidParameterError,
    SamplingParams,
)

# No text averages more characters per token than this: a longer prompt cannot fit.
MAX_CHARS_PER_TOKEN = 32
# Every message costs the template at least a token of its own (its role, its markers).
MESSAGE_OVERHEAD_CHARS = MAX_CHARS_PER_TOKEN


@dataclass
class Conversation:
    """What to answer, in OpenAI's chat shape.

    ``messages`` are dicts with ``role`` ("system", "user", "assistant" or "tool"),
    ``content`` (a string), and where they apply ``tool_calls`` (``[{"id", "type":
    "function", "function": {"name", "arguments"}}]``, arguments as JSON text),
    ``tool_call_id`` and ``name``. ``tools`` are OpenAI function tools (``{"type":
    "function", "function": {"name", "description", "parameters"}}``). ``tool_choice`` is
    "none", "auto", "required" or the name of one tool. ``template_kwargs`` go into the chat
    template's render (e.g. ``enable_thinking``); ``thinking_budget`` is the most tokens a
    reasoning block the prompt opens may take before its end is forced.
    """

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] = field(default_factory=list)
    tool_choice: str = "auto"
    parallel_tool_calls: bool = True
    response_format: dict[str, Any] | None = None
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    thinking_budget: int | None = None

    def __post_init__(self) -> None:
        names = [tool["function"]["name"] for tool in self.tools]
        if self.tool_choice not in ("none", "auto", "required") and self.tool_choice not in names:
            raise InvalidParameterError(
                "tool_choice", f"names no tool of this request ({self.tool_choice!r})"
            )
        if self.tool_choice == "required" and not self.tools:
            raise InvalidParameterError("tool_choice", "'required' needs at least one tool")

    @property
    def forces_a_call(self) -> bool:
        """Whether the reply must be a tool call ("required", or one tool named)."""
        return self.tool_choice not in ("none", "auto")

    @property
    def calls_tools(self) -> bool:
        """Whether the reply may contain tool calls (and so must be parsed for them)."""
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def chars(self) -> int:
        """How many characters reach the chat template (counted before any tokenizing)."""
        return template_chars(self.messages, [*self.tools, self.template_kwargs])

    @property
    def grammar_param(self) -> str:
        """The field a grammar that cannot be compiled is blamed on: the forced tool's
        parameters (all the tools', when any may be called), or the response format."""
        if not self.forces_a_call:
            return "response_format"
        forced = [
            i
            for i, tool in enumerate(self.tools)
            if self.tool_choice in ("required", tool["function"]["name"])
        ]
        return f"tools[{forced[0]}].function.parameters" if len(forced) == 1 else "tools"


@dataclass(frozen=True)
class RawPrompt:
    """A prompt to continue as it is, with no chat template: text, or token ids."""

    prompt: str | list[int]
    response_format: dict[str, Any] | None = None
    grammar_param = "response_format"

    @property
    def chars(self) -> int:
        """How many characters reach the tokenizer (token ids: none)."""
        return len(self.prompt) if isinstance(self.prompt, str) else 0


Prompt = Conversation | RawPrompt


def template_chars(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> int:
    """How many characters reach the chat template: every string (and key) of the messages
    and tools, plus an overhead per message; counted without walking any string itself."""
    total = MESSAGE_OVERHEAD_CHARS * len(messages)
    pending: list[Any] = [messages, tools]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            total += len(item)
        elif isinstance(item, Mapping):
            total += sum(len(key) for key in item if isinstance(key, str))
            pending.extend(item.values())
        elif isinstance(item, list | tuple):
            pending.extend(item)
        elif item is not None:
            total += 8  # a number or a boolean, written out
    return total


REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh", "max")


def template_kwargs(
    given: Mapping[str, Any] | None,
    *,
    effort: str | None = None,
    thinking: bool | None = None,
) -> dict[str, Any]:
    """The chat template's extra variables: what a request's reasoning switches say
    (``reasoning_effort``; effort "none" or thinking off: ``enable_thinking=False``), under
    the request's own ``chat_template_kwargs``."""
    kwargs: dict[str, Any] = {}
    if effort is not None:
        kwargs["reasoning_effort"] = effort
        if effort == "none":
            kwargs["enable_thinking"] = False
    if thinking is not None:
        kwargs["enable_thinking"] = thinking
    return {**kwargs, **(given or {})}


@dataclass(frozen=True)
class RequestedSampling:
    """The sampling a request asked for, checked once when built; once its model is loaded,
    :meth:`with_defaults` fills what it left unset from the model's entry and family.

    ``params`` are the request's own values over the built-in defaults; ``unset`` names the
    ones it left to the model (request > model entry > family > ``default_max_tokens``, for
    max_tokens > built-in). ``renames`` maps SamplingParams names to the API's field names,
    for errors.
    """

    params: SamplingParams = field(default_factory=SamplingParams)
    unset: frozenset[str] = frozenset()
    default_max_tokens: int | None = None
    renames: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def of(
        cls,
        requested: Mapping[str, Any],
        *,
        default_max_tokens: int | None = None,
        renames: Mapping[str, str] | None = None,
        **fixed: Any,
    ) -> RequestedSampling:
        """Check a request's values: ``requested`` ones left None fall back to the model's
        defaults; ``fixed`` ones are taken as they are (None: built-in). An invalid value is
        an InvalidParameterError naming the request's field."""
        renames = dict(renames or {})
        given = {k: v for k, v in {**requested, **fixed}.items() if v is not None}
        params = _named(renames, lambda: SamplingParams(**given))
        unset = frozenset(name for name, value in requested.items() if value is None)
        return cls(params, unset, default_max_tokens, renames)

    def with_defaults(
        self, entry: Mapping[str, Any], family: Mapping[str, float]
    ) -> SamplingParams:
        """The parameters to sample with: what the request left unset taken from its model's
        entry (``[models.NAME]``), then its family's recommendations."""
        filled = {}
        for name in self.unset:
            value = entry.get(name)
            if value is None and name in DEFAULTABLE_PARAMS:
                value = family.get(name)
            if value is None and name == "max_tokens":
                value = self.default_max_tokens
            if value is not None:
                filled[name] = value
        if not filled:
            return self.params
        return _named(self.renames, lambda: replace(self.params, **filled))


T = TypeVar("T")


def _named(renames: Mapping[str, str], build: Callable[[], T]) -> T:
    """``build()``, its InvalidParameterError naming the field as the API calls it."""
    try:
        return build()
    except InvalidParameterError as exc:
        param = renames.get(exc.param, exc.param)
        message = str(exc).removeprefix(f"{exc.param}: ")
        raise InvalidParameterError(param, message) from None
