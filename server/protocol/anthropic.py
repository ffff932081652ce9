"""Wire schemas of Anthropic's Messages API (``POST /v1/messages``), and its error shape."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Discriminator, Field, Tag, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from mlxserve.core.errors import ContextLengthError
from mlxserve.core.sampling.params import INT32_MAX, MAX_STOP_STRINGS, InvalidParameterError
from mlxserve.server.protocol.openai import (
    MAX_MESSAGES,
    MAX_PARTS,
    Float,
    Int,
    OpenAIBaseModel,
    Text,
    at_most,
    printable,
)
from mlxserve.server.protocol.request import Conversation, RequestedSampling, template_kwargs

# HTTP status -> Anthropic's error type
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
}


def anthropic_error_body(status: int, message: str) -> dict[str, Any]:
    """``{"type": "error", "error": {"type", "message"}}``, the type chosen by status."""
    kind = ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": printable(message)}}


def context_error_message(exc: ContextLengthError) -> str:
    """Anthropic's own words for a context overflow, which clients such as Claude Code read
    (and recover from: compacting the conversation, or asking for fewer tokens)."""
    limit, prompt_tokens, max_tokens = exc.limit, exc.prompt_tokens, exc.max_tokens
    if limit is None or prompt_tokens is None:
        return str(exc)
    if max_tokens is None:
        return f"prompt is too long: {prompt_tokens} tokens > {limit} maximum"
    return (
        f"input length and `max_tokens` exceed context limit: {prompt_tokens} + {max_tokens} > "
        f"{limit}, decrease input length or `max_tokens` and try again"
    )


# --- requests ----------------------------------------------------------------------------------

IGNORED_BLOCKS = ("thinking", "redacted_thinking")  # our own replies never have them
KNOWN_BLOCKS = ("text", "tool_use", "tool_result")


def _text_blocks_only(blocks: Any, where: str) -> Any:
    for block in blocks if isinstance(blocks, list) else ():
        kind = block.get("type") if isinstance(block, dict) else None
        if isinstance(kind, str) and kind != "text":
            raise PydanticCustomError(
                "unsupported_content",
                "'{kind}' blocks are not supported in {where}; mlxserve serves text-only "
                "models, so send text",
                {"kind": printable(kind), "where": where},
            )
    return blocks


class TextBlock(OpenAIBaseModel):
    type: Literal["text"]
    text: Text


class ToolUseBlock(OpenAIBaseModel):
    type: Literal["tool_use"]
    id: Text
    name: Text
    input: dict[str, Any]


class ToolResultBlock(OpenAIBaseModel):
    type: Literal["tool_result"]
    tool_use_id: Text
    content: Annotated[Text | list[TextBlock], at_most(MAX_PARTS)] = ""
    is_error: bool = False

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, content: Any) -> Any:
        return _text_blocks_only(content, "tool results")

    def text(self) -> str:
        content = self.content
        text = content if isinstance(content, str) else "\n".join(b.text for b in content)
        return f"Error: {text}" if self.is_error else text


Block = Annotated[
    Annotated[TextBlock, Tag("text")]
    | Annotated[ToolUseBlock, Tag("tool_use")]
    | Annotated[ToolResultBlock, Tag("tool_result")],
    Discriminator(lambda v: v.get("type") if isinstance(v, dict) else getattr(v, "type", None)),
]


class InputMessage(OpenAIBaseModel):
    """One turn of the conversation: a ``system`` one (text only) may stand anywhere, as
    Claude Code's ``mid-conversation-system`` beta sends them."""

    role: Literal["user", "assistant", "system"]
    content: Annotated[Text | list[Block], at_most(MAX_PARTS)]

    @field_validator("content", mode="before")
    @classmethod
    def _supported_blocks(cls, content: Any, info: ValidationInfo) -> Any:
        if not isinstance(content, list):
            return content
        if info.data.get("role") == "system":
            return _text_blocks_only(content, "system messages")
        kept = []
        for block in content:
            kind = block.get("type") if isinstance(block, dict) else None
            if kind in IGNORED_BLOCKS:
                continue
            if isinstance(kind, str) and kind not in KNOWN_BLOCKS:
                raise PydanticCustomError(
                    "unsupported_content",
                    "'{kind}' blocks are not supported; mlxserve serves text-only models, "
                    "so send text, tool_use and tool_result blocks",
                    {"kind": printable(kind)},
                )
            kept.append(block)
        return kept

    def blocks(self) -> list[TextBlock | ToolUseBlock | ToolResultBlock]:
        if isinstance(self.content, str):
            return [TextBlock(type="text", text=self.content)]
        return list(self.content)


class Tool(OpenAIBaseModel):
    """A client tool; Anthropic's server tools (web search, code execution…) are refused."""

    type: Literal["custom"] | None = None
    name: Annotated[Text, Field(pattern=r"^[A-Za-z0-9_-]{1,128}$")]
    description: Text | None = None
    input_schema: dict[str, Any]


class ToolChoice(OpenAIBaseModel):
    type: Literal["auto", "any", "tool", "none"]
    name: Text | None = None
    disable_parallel_tool_use: bool = False


class ThinkingConfig(OpenAIBaseModel):
    """``thinking``: "enabled" with a ``budget_tokens`` (the most tokens the thinking may
    take before it is ended and the answer begins), "adaptive" (no budget) or "disabled"."""

    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: Int | None = Field(None, ge=1, le=INT32_MAX)
    display: Literal["summarized", "omitted"] | None = None


class MessagesInput(OpenAIBaseModel):
    """What a Messages body gives the prompt: shared by ``POST /v1/messages`` and
    ``POST /v1/messages/count_tokens``, so both render it the same way."""

    model: Text
    messages: Annotated[list[InputMessage], at_most(MAX_MESSAGES)] = Field(min_length=1)
    system: Annotated[Text | list[TextBlock] | None, at_most(MAX_PARTS)] = None
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: ToolChoice | None = None
    thinking: ThinkingConfig | None = None

    @field_validator("system", mode="before")
    @classmethod
    def _system_text_only(cls, system: Any) -> Any:
        return _text_blocks_only(system, "system")

    @field_validator("tools", mode="before")
    @classmethod
    def _client_tools_only(cls, tools: Any) -> Any:
        for tool in tools if isinstance(tools, list) else ():
            kind = tool.get("type") if isinstance(tool, dict) else None
            if kind not in (None, "custom"):
                raise PydanticCustomError(
                    "unsupported_tool",
                    "'{kind}' is a server tool, which mlxserve does not have; send client "
                    "tools (name, description, input_schema)",
                    {"kind": printable(str(kind))},
                )
        return tools

    def check_supported(self) -> None:
        """Raise InvalidParameterError for a well-formed request this server cannot serve."""
        if self.messages[-1].role == "assistant":
            raise InvalidParameterError(
                "messages", "a last assistant message (prefill) is not supported by mlxserve"
            )
        if self.tool_choice and self.tool_choice.type == "tool" and not self.tool_choice.name:
            raise InvalidParameterError("tool_choice.name", "type 'tool' needs the tool's name")
        thinking = self.thinking
        if thinking is not None and thinking.type == "enabled" and thinking.budget_tokens is None:
            raise InvalidParameterError("thinking.budget_tokens", "type 'enabled' needs it")

    def conversation(self) -> Conversation:
        """The request as the shared pipeline's conversation."""
        thinking = self.thinking
        enabled = None if thinking is None else thinking.type != "disabled"
        return Conversation(
            self.chat_messages(),
            self.tool_dicts(),
            self.tool_choice_name(),
            self.parallel_tool_calls,
            template_kwargs=template_kwargs(None, thinking=enabled),
            thinking_budget=thinking.budget_tokens if thinking and enabled else None,
        )

    def chat_messages(self) -> list[dict[str, Any]]:
        """The conversation in OpenAI's chat shape: tool results become ``tool`` messages."""
        messages: list[dict[str, Any]] = []
        if self.system:
            system = self.system
            text = system if isinstance(system, str) else "\n".join(b.text for b in system)
            messages.append({"role": "system", "content": text})
        tool_names: dict[str, str] = {}
        for message in self.messages:
            texts, calls = [], []
            for block in message.blocks():
                if isinstance(block, TextBlock):
                    texts.append(block.text)
                elif isinstance(block, ToolUseBlock):
                    tool_names[block.id] = block.name
                    arguments = json.dumps(block.input, ensure_ascii=False)
                    function = {"name": block.name, "arguments": arguments}
                    calls.append({"id": block.id, "type": "function", "function": function})
                else:
                    messages.append(
                        {
                            "role": "tool",
                            "tool_call_id": block.tool_use_id,
                            "name": tool_names.get(block.tool_use_id, ""),
                            "content": block.text(),
                        }
                    )
            if texts or calls or isinstance(message.content, str):
                entry: dict[str, Any] = {"role": message.role, "content": "\n".join(texts)}
                if calls:
                    entry["tool_calls"] = calls
                messages.append(entry)
        return messages

    def tool_dicts(self) -> list[dict[str, Any]]:
        """The tools as OpenAI function tools."""
        return [
            {
                "type": "function",
                "function": {
                    "name": tool.name,
                    "description": tool.description or "",
                    "parameters": tool.input_schema,
                },
            }
            for tool in self.tools or ()
        ]

    def tool_choice_name(self) -> str:
        """``tool_choice`` as "none", "auto", "required" or the one tool's name."""
        choice = self.tool_choice
        if choice is None:
            return "auto" if self.tools else "none"
        if choice.type == "tool":
            return choice.name or ""
        return {"any": "required"}.get(choice.type, choice.type)

    @property
    def parallel_tool_calls(self) -> bool:
        return not (self.tool_choice and self.tool_choice.disable_parallel_tool_use)


class MessagesRequest(MessagesInput):
    """A ``POST /v1/messages`` body."""

    max_tokens: Int = Field(ge=1, le=INT32_MAX)
    stop_sequences: Annotated[list[Text], Field(max_length=MAX_STOP_STRINGS)] | None = None
    temperature: Float | None = Field(None, ge=0, le=1)
    top_p: Float | None = None
    top_k: Int | None = Field(None, ge=0, le=INT32_MAX)
    stream: bool = False
    metadata: dict[str, Any] | None = None

    def check_supported(self) -> None:
        super().check_supported()
        thinking = self.thinking
        budget = thinking.budget_tokens if thinking and thinking.type == "enabled" else None
        if budget is not None and budget >= self.max_tokens:
            raise InvalidParameterError(
                "thinking.budget_tokens",
                f"must be less than max_tokens ({budget} >= {self.max_tokens})",
            )

    def sampling(self) -> RequestedSampling:
        """The sampling asked for, checked (request > model entry > family > built-in)."""
        requested = {
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
        }
        return RequestedSampling.of(requested, stop=tuple(self.stop_sequences or ()))


class CountTokensRequest(MessagesInput):
    """A ``POST /v1/messages/count_tokens`` body: a Messages body without ``max_tokens``
    and sampling (sent anyway, they are ignored)."""


# --- responses ---------------------------------------------------------------------------------

StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]


class ThinkingOut(BaseModel):
    """A thinking model's reasoning; mlxserve signs nothing, so ``signature`` is empty."""

    type: Literal["thinking"] = "thinking"
    thinking: str
    signature: str = ""


class TextOut(BaseModel):
    type: Literal["text"] = "text"
    text: str


class ToolUseOut(BaseModel):
    type: Literal["tool_use"] = "tool_use"
    id: str
    name: str
    input: dict[str, Any]


class MessageUsage(BaseModel):
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0


class MessageResponse(BaseModel):
    """A ``POST /v1/messages`` answer."""

    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[ThinkingOut | TextOut | ToolUseOut] = []
    stop_reason: StopReason | None = None
    stop_sequence: str | None = None
    usage: MessageUsage = MessageUsage()


class MessageTokensCount(BaseModel):
    """A ``POST /v1/messages/count_tokens`` answer: the prompt's length, as a Messages
    request with this body would report it in ``usage.input_tokens``."""

    input_tokens: int
