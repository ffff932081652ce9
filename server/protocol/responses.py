"""Wire schemas of OpenAI's Responses API (``POST /v1/responses``), served statelessly."""

from __future__ import annotations

import time
from collections import Counter
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from mlxserve.core.sampling.params import InvalidParameterError
from mlxserve.server.protocol.openai import (
    MAX_MESSAGES,
    MAX_PARTS,
    Float,
    Int,
    OpenAIBaseModel,
    ReasoningEffort,
    Text,
    at_most,
    printable,
)
from mlxserve.server.protocol.request import Conversation, RequestedSampling, template_kwargs

STATELESS = "mlxserve keeps no state; send the whole conversation in input"
ITEM_TYPES = ("message", "function_call", "function_call_output", "reasoning")


def _unsupported_kinds(values: Any, allowed: tuple[str, ...], what: str, hint: str) -> Any:
    for value in values if isinstance(values, list) else ():
        kind = value.get("type") if isinstance(value, dict) else None
        if isinstance(kind, str) and kind not in allowed:
            raise PydanticCustomError(
                "unsupported",
                "{what} of type '{kind}' are not supported; {hint}",
                {"what": what, "kind": printable(kind), "hint": hint},
            )
    return values


class InputText(OpenAIBaseModel):
    type: Literal["input_text", "output_text"]
    text: Text


def _joined(content: str | list[InputText]) -> str:
    return content if isinstance(content, str) else "\n".join(part.text for part in content)


class MessageItem(OpenAIBaseModel):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: Annotated[Text | list[InputText], at_most(MAX_PARTS)]

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, content: Any) -> Any:
        hint = "mlxserve serves text-only models, so send input_text parts"
        return _unsupported_kinds(content, ("input_text", "output_text"), "content parts", hint)


class FunctionCallItem(OpenAIBaseModel):
    type: Literal["function_call"]
    call_id: Text
    name: Text
    arguments: Text = "{}"
    namespace: Text | None = None  # a call of a tool in a namespace names both


class FunctionCallOutputItem(OpenAIBaseModel):
    type: Literal["function_call_output"]
    call_id: Text
    output: Annotated[Text | list[InputText], at_most(MAX_PARTS)]

    @field_validator("output", mode="before")
    @classmethod
    def _text_only(cls, output: Any) -> Any:
        hint = "send the output as text"
        return _unsupported_kinds(output, ("input_text", "output_text"), "output parts", hint)


class ReasoningItem(OpenAIBaseModel):
    """A reasoning item of an earlier reply, sent back: accepted and left out of the prompt
    (chat templates drop past reasoning too)."""

    type: Literal["reasoning"]


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")]
    | Annotated[ReasoningItem, Tag("reasoning")],
    Discriminator(
        lambda v: v.get("type", "message") if isinstance(v, dict) else getattr(v, "type", None)
    ),
]


class FunctionTool(OpenAIBaseModel):
    """A function tool, flat: ``{"type": "function", "name", "description", "parameters"}``."""

    type: Literal["function"]
    name: Annotated[Text, Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")]
    description: Text | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamespaceTool(OpenAIBaseModel):
    """A named group of function tools (Codex sends its MCP and agent tools so); each call
    of one names the tool and its namespace apart."""

    type: Literal["namespace"]
    name: Annotated[Text, Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")]
    description: Text | None = None
    tools: list[FunctionTool] = Field(max_length=128)

    @field_validator("tools", mode="before")
    @classmethod
    def _function_tools(cls, tools: Any) -> Any:
        return _unsupported_kinds(tools, ("function",), "namespace tools", "send function tools")


def _drop_hosted(tools: Any) -> tuple[Any, list[str]]:
    """The tools mlxserve can offer a model (functions, namespaces of them), and the types of
    those it leaves out: hosted tools it cannot run (web search, code interpreter, ...)."""
    if not isinstance(tools, list):
        return tools, []
    kept, left_out = [], []
    for tool in tools:
        kind = tool.get("type") if isinstance(tool, dict) else None
        if isinstance(kind, str) and kind not in ("function", "namespace"):
            left_out.append(printable(kind)[:64])
        else:
            kept.append(tool)
    return kept, left_out


class FunctionToolChoice(OpenAIBaseModel):
    type: Literal["function"]
    name: Text


class TextFormat(OpenAIBaseModel):
    """``text.format``: plain text, any JSON object, or JSON following ``schema``."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    type: Literal["text", "json_object", "json_schema"]
    name: Text | None = None
    description: Text | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class TextConfig(OpenAIBaseModel):
    format: TextFormat | None = None


class ReasoningConfig(OpenAIBaseModel):
    """``reasoning``: ``effort`` reaches the chat template as ``reasoning_effort`` ("none"
    also turns thinking off); ``summary`` is accepted (the reasoning comes whole)."""

    effort: ReasoningEffort | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None


class ResponsesRequest(OpenAIBaseModel):
    """A ``POST /v1/responses`` body."""

    model: Text | None = None
    input: Annotated[Text | list[InputItem], at_most(MAX_MESSAGES)]
    instructions: Text | None = None
    tools: list[FunctionTool | NamespaceTool] | None = Field(None, max_length=128)
    ignored_tools: list[str] = Field(default_factory=list, exclude=True)
    tool_choice: Literal["none", "auto", "required"] | FunctionToolChoice | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    max_output_tokens: Int | None = None
    temperature: Float | None = None
    top_p: Float | None = None
    stream: bool = False
    metadata: dict[str, Text] | None = None
    user: Text | None = None
    store: bool | None = None
    previous_response_id: Text | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _known_items(cls, items: Any) -> Any:
        hint = "send message, function_call and function_call_output items"
        return _unsupported_kinds(items, ITEM_TYPES, "input items", hint)

    @model_validator(mode="before")
    @classmethod
    def _hosted_tools_left_out(cls, data: Any) -> Any:
        if isinstance(data, dict) and "tools" in data:
            tools, left_out = _drop_hosted(data["tools"])
            return {**data, "tools": tools, "ignored_tools": left_out}
        return data

    def flat_tools(self) -> list[tuple[str, FunctionTool, str | None]]:
        """Every function tool as (the name the model sees, the tool, its namespace): a
        namespaced tool keeps its own name unless another tool has it too."""
        pairs: list[tuple[FunctionTool, str | None]] = [
            (tool, group.name)
            for group in self.tools or ()
            if isinstance(group, NamespaceTool)
            for tool in group.tools
        ]
        pairs += [(t, None) for t in self.tools or () if isinstance(t, FunctionTool)]
        counts = Counter(tool.name for tool, _ in pairs)
        return [
            (f"{ns}__{tool.name}" if ns and counts[tool.name] > 1 else tool.name, tool, ns)
            for tool, ns in pairs
        ]

    def call_names(self, flat_name: str) -> tuple[str, str | None]:
        """(name, namespace) of a call of the tool the model knows as ``flat_name``."""
        for flat, tool, namespace in self.flat_tools():
            if flat == flat_name:
                return tool.name, namespace
        return flat_name, None

    def check_supported(self) -> None:
        """Raise InvalidParameterError for a well-formed request this server cannot serve."""
        if self.previous_response_id is not None:
            raise InvalidParameterError("previous_response_id", STATELESS)
        if self.store:
            raise InvalidParameterError("store", f"must be false: {STATELESS}")
        extra = self.model_extra or {}
        for name in ("conversation", "prompt"):
            if extra.get(name) is not None:
                raise InvalidParameterError(name, f"is not supported: {STATELESS}")
        if extra.get("background"):
            raise InvalidParameterError("background", "background responses are not supported")

    def conversation(self) -> Conversation:
        """The request as the shared pipeline's conversation."""
        return Conversation(
            self.chat_messages(),
            self.tool_dicts(),
            self.tool_choice_name(),
            self.parallel_tool_calls is not False,
            self.response_format(),
            template_kwargs(None, effort=self.reasoning.effort if self.reasoning else None),
        )

    def sampling(self) -> RequestedSampling:
        """The sampling asked for, checked (request > model entry > family > built-in)."""
        self.check_supported()
        requested = {
            "max_tokens": self.max_output_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
        }
        renames = {"max_tokens": "max_output_tokens"}
        return RequestedSampling.of(requested, renames=renames)

    def chat_messages(self) -> list[dict[str, Any]]:
        """The conversation in OpenAI's chat shape: instructions first, as a system message;
        function calls join the assistant message before them."""
        messages: list[dict[str, Any]] = []
        if self.instructions:
            messages.append({"role": "system", "content": self.instructions})
        items = (
            [MessageItem(role="user", content=self.input)]
            if isinstance(self.input, str)
            else self.input
        )
        names: dict[str, str] = {}
        for item in items:
            if isinstance(item, ReasoningItem):
                continue
            if isinstance(item, MessageItem):
                role = "system" if item.role == "developer" else item.role
                messages.append({"role": role, "content": _joined(item.content)})
            elif isinstance(item, FunctionCallItem):
                flat = {(t.name, ns): f for f, t, ns in self.flat_tools()}
                name = flat.get((item.name, item.namespace), item.name)
                names[item.call_id] = name
                call = {
                    "id": item.call_id,
                    "type": "function",
                    "function": {"name": name, "arguments": item.arguments},
                }
                last = messages[-1] if messages else None
                if last is None or last["role"] != "assistant":
                    last = {"role": "assistant", "content": ""}
                    messages.append(last)
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append(
                    {
                        "role": "tool",
                        "tool_call_id": item.call_id,
                        "name": names.get(item.call_id, ""),
                        "content": _joined(item.output),
                    }
                )
        return messages

    def tool_dicts(self) -> list[dict[str, Any]]:
        """The tools as OpenAI chat function tools (nested under ``function``)."""
        return [
            {
                "type": "function",
                "function": {**tool.model_dump(exclude={"type"}, exclude_none=True), "name": flat},
            }
            for flat, tool, _ in self.flat_tools()
        ]

    def tool_choice_name(self) -> str:
        """``tool_choice`` as "none", "auto", "required" or the one function's name."""
        if isinstance(self.tool_choice, FunctionToolChoice):
            return self.tool_choice.name
        return self.tool_choice or "auto"

    def echoed_tool_choice(self) -> str | dict[str, Any]:
        if isinstance(self.tool_choice, FunctionToolChoice):
            return self.tool_choice.model_dump()
        return self.tool_choice or "auto"

    def response_format(self) -> dict[str, Any] | None:
        """``text.format`` as a chat ``response_format``; None for plain text."""
        fmt = self.text.format if self.text else None
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            return {"type": "json_object"}
        spec = {"name": fmt.name or "output", "schema": fmt.json_schema, "strict": fmt.strict}
        return {
            "type": "json_schema",
            "json_schema": {k: v for k, v in spec.items() if v is not None},
        }

    def echoed_text(self) -> dict[str, Any]:
        fmt = self.text.format if self.text and self.text.format else TextFormat(type="text")
        return {"format": fmt.model_dump(by_alias=True, exclude_none=True)}


# --- responses ---------------------------------------------------------------------------------


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str = ""
    annotations: list[Any] = []
    logprobs: list[Any] = []


class ReasoningText(BaseModel):
    type: Literal["reasoning_text"] = "reasoning_text"
    text: str = ""


class OutputReasoning(BaseModel):
    """A thinking model's reasoning, whole (``content``); it has no summary."""

    type: Literal["reasoning"] = "reasoning"
    id: str
    summary: list[Any] = []
    content: list[ReasoningText] = []
    status: Literal["in_progress", "completed", "incomplete"] = "in_progress"


class OutputMessage(BaseModel):
    type: Literal["message"] = "message"
    id: str
    status: Literal["in_progress", "completed", "incomplete"] = "in_progress"
    role: Literal["assistant"] = "assistant"
    content: list[OutputText] = []


class OutputFunctionCall(BaseModel):
    type: Literal["function_call"] = "function_call"
    id: str
    call_id: str
    name: str
    arguments: str = ""
    status: Literal["in_progress", "completed", "incomplete"] = "in_progress"
    namespace: str | None = None


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0
    cache_write_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int = 0
    input_tokens_details: InputTokensDetails = InputTokensDetails()
    output_tokens: int = 0
    output_tokens_details: OutputTokensDetails = OutputTokensDetails()
    total_tokens: int = 0


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens"] = "max_output_tokens"


class ResponseError(BaseModel):
    code: str
    message: str


class ResponseObject(BaseModel):
    """A response: the generated output items, their status and usage, and the request's
    settings echoed back."""

    id: str
    object: Literal["response"] = "response"
    created_at: int = Field(default_factory=lambda: int(time.time()))
    status: Literal["in_progress", "completed", "incomplete", "failed"] = "in_progress"
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    model: str
    output: list[OutputReasoning | OutputMessage | OutputFunctionCall] = []
    parallel_tool_calls: bool = True
    previous_response_id: str | None = None
    reasoning: dict[str, Any] | None = None
    store: bool = False
    temperature: float | None = None
    text: dict[str, Any] = {"format": {"type": "text"}}
    tool_choice: str | dict[str, Any] = "auto"
    tools: list[dict[str, Any]] = []
    top_p: float | None = None
    truncation: Literal["disabled"] = "disabled"
    usage: ResponseUsage | None = None
    user: str | None = None
    metadata: dict[str, str] = {}
