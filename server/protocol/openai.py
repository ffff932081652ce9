"""Wire schemas of the OpenAI-compatible API: requests, responses, errors and SSE framing."""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    Strict,
    field_validator,
    model_serializer,
)
from pydantic_core import PydanticCustomError

from mlxserve.core.sampling.params import (
    INT32_MAX,
    MAX_LOGIT_BIAS,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
    InvalidParameterError,
)
from mlxserve.server.protocol.request import (
    Conversation,
    RawPrompt,
    RequestedSampling,
    template_chars,
    template_kwargs,
)

FinishReason = Literal["stop", "length", "tool_calls"]


def new_id(prefix: str) -> str:
    """Return a fresh response id such as ``chatcmpl-<hex>``."""
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    """Return the current Unix time in whole seconds."""
    return int(time.time())


class OpenAIBaseModel(BaseModel):
    """Base of request models: unknown fields are kept and ignored, as clients send many."""

    model_config = ConfigDict(extra="allow")


class _Response(BaseModel):
    """Base of response models: None fields are left out unless listed in ``_keep_none``."""

    _keep_none: ClassVar[frozenset[str]] = frozenset()

    # Unannotated on purpose: a return annotation would replace each model's JSON schema.
    @model_serializer(mode="wrap")
    def _drop_none(self, handler: SerializerFunctionWrapHandler):  # type: ignore[no-untyped-def]
        data = handler(self)
        return {k: v for k, v in data.items() if v is not None or k in self._keep_none}


# --- errors ------------------------------------------------------------------------------------


class ErrorInfo(_Response):
    """The ``error`` object of an error response."""

    _keep_none = frozenset({"param", "code"})

    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(_Response):
    """An error response body."""

    error: ErrorInfo


def printable(text: str) -> str:
    """``text`` with any lone surrogate written as an escape, so it can be encoded as UTF-8."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_body(
    message: str,
    type: str = "invalid_request_error",
    param: str | None = None,
    code: str | int | None = None,
) -> dict[str, Any]:
    """Return an OpenAI-style error body: ``{"error": {message, type, param, code}}``."""
    param = printable(param) if param is not None else None
    info = ErrorInfo(message=printable(message), type=type, param=param, code=code)
    return ErrorResponse(error=info).model_dump()


# --- requests ----------------------------------------------------------------------------------


def _valid_unicode(text: str) -> str:
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise PydanticCustomError(
                "lone_surrogate",
                "contains a lone surrogate (an unpaired \\ud800-\\udfff escape), which is not text",
            ) from None
    return text


# Lists are checked for length before their items are: the event loop validates bodies, and
# must not spend time in proportion to a request's size on one it refuses.
MAX_MESSAGES = 16_384
MAX_PARTS = 4_096


def at_most(limit: int) -> BeforeValidator:
    """A field check that a list value has at most ``limit`` items, before they are read."""

    def check(value: Any) -> Any:
        if isinstance(value, list) and len(value) > limit:
            raise PydanticCustomError(
                "too_long",
                "must have at most {limit} items, not {count}",
                {"limit": limit, "count": len(value)},
            )
        return value

    return BeforeValidator(check)


# JSON allows unpaired surrogate escapes; no tokenizer or UTF-8 encoder takes them.
Text = Annotated[str, AfterValidator(_valid_unicode)]
# Strict: JSON true is not 1, and "5" is not 5 (a float field still takes an integer).
Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]
TokenId = Annotated[int, Strict(), Field(ge=0)]
Seed = Annotated[int, Strict(), Field(ge=-(2**63), le=2**63 - 1)]


ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"]
MAX_TEMPLATE_KWARGS = 64
MAX_TEMPLATE_KWARGS_CHARS = 65_536
# What apply_chat_template itself takes or the render sets: a request cannot override them.
RESERVED_TEMPLATE_KWARGS = frozenset(
    {
        "messages",
        "conversation",
        "tools",
        "documents",
        "add_generation_prompt",
        "continue_final_message",
        "chat_template",
        "tokenize",
        "padding",
        "truncation",
        "max_length",
        "return_tensors",
        "return_dict",
        "return_assistant_tokens_mask",
        "tokenizer_kwargs",
        "raise_exception",
        "strftime_now",
    }
)
TEMPLATE_VARIABLE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")


def _template_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    for key in kwargs:
        if not TEMPLATE_VARIABLE.match(key):
            raise PydanticCustomError(
                "template_variable",
                "keys must be template variable names (letters, digits and _, at most 64), "
                "not {key!r}",
                {"key": printable(key[:80])},
            )
        if key in RESERVED_TEMPLATE_KWARGS:
            raise PydanticCustomError(
                "template_variable", "{key!r} is set by the server, not by a request", {"key": key}
            )
    chars = template_chars([], [kwargs])
    if chars > MAX_TEMPLATE_KWARGS_CHARS:
        raise PydanticCustomError(
            "too_long",
            "must have at most {limit} characters in all, not {count}",
            {"limit": MAX_TEMPLATE_KWARGS_CHARS, "count": chars},
        )
    return kwargs


TemplateKwargs = Annotated[
    dict[str, Any],
    Field(max_length=MAX_TEMPLATE_KWARGS),
    AfterValidator(_template_kwargs),
]


class StreamOptions(OpenAIBaseModel):
    """Options of a streamed response."""

    include_usage: bool = False


class TextContentPart(OpenAIBaseModel):
    """A text part of a message's content."""

    type: Literal["text"]
    text: Text


class FunctionCall(OpenAIBaseModel):
    """The function a tool call calls, with its arguments as JSON text."""

    name: Text
    arguments: Text = "{}"


class ToolCallIn(OpenAIBaseModel):
    """A tool call of an assistant message in the history."""

    id: Text
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionDefinition(OpenAIBaseModel):
    """A function the model may call: its name, what it does, and its JSON-Schema parameters."""

    name: Annotated[Text, Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")]
    description: Text | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None


class ChatTool(OpenAIBaseModel):
    """A tool of a chat request (function tools only)."""

    type: Literal["function"]
    function: FunctionDefinition


class NamedToolChoice(OpenAIBaseModel):
    """``tool_choice`` naming one function: ``{"type": "function", "function": {"name"}}``."""

    type: Literal["function"]
    function: dict[Literal["name"], Text]


class ChatMessage(OpenAIBaseModel):
    """One message of a chat conversation."""

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Annotated[Text | list[TextContentPart] | None, at_most(MAX_PARTS)] = None
    name: Text | None = None
    tool_calls: Annotated[list[ToolCallIn] | None, at_most(MAX_PARTS)] = None
    tool_call_id: Text | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _only_text_parts(cls, content: Any) -> Any:
        for part in content if isinstance(content, list) else ():
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text" and isinstance(kind, str):
                raise PydanticCustomError(
                    "unsupported_content",
                    "'{kind}' content parts are not supported; mlxserve serves text-only models, "
                    "so send content as a string or as 'text' parts",
                    {"kind": printable(kind)},  # pydantic cannot render lone surrogates
                )
        return content

    def text(self) -> str:
        """Return the content as one string; text parts are joined with newlines."""
        if isinstance(self.content, list):
            return "\n".join(part.text for part in self.content)
        return self.content or ""


class _SamplingRequest(OpenAIBaseModel):
    """Fields and sampling-parameter mapping shared by chat and text completions."""

    _default_max_tokens: ClassVar[int | None] = None

    model: Text | None = None
    max_tokens: Int | None = None
    temperature: Float | None = None
    top_p: Float | None = None
    top_k: Int | None = Field(
        None, description="Sample from the k most likely tokens; 0 is off.", le=INT32_MAX
    )
    min_p: Float | None = Field(
        None, description="Drop tokens less likely than min_p times the most likely one."
    )
    n: Int | None = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Text | Annotated[list[Text], Field(max_length=MAX_STOP_STRINGS)] | None = None
    seed: Seed | None = None
    presence_penalty: Float | None = None
    frequency_penalty: Float | None = None
    repetition_penalty: Float | None = Field(
        None, description="Hugging Face style penalty on already seen tokens; 1 is off."
    )
    logit_bias: dict[str, Float] | None = Field(None, max_length=MAX_LOGIT_BIAS)
    user: Text | None = None
    ignore_eos: bool = Field(False, description="Keep generating past the end-of-text token.")
    stop_token_ids: list[TokenId] | None = Field(
        None,
        description="Token ids that end generation, besides the model's own.",
        max_length=MAX_STOP_TOKEN_IDS,
    )
    response_format: dict[str, Any] | None = Field(
        None,
        description='{"type": "text"}, {"type": "json_object"} or {"type": "json_schema", '
        '"json_schema": {"name", "schema", ...}}: the output follows it by constrained decoding.',
    )

    @property
    def include_usage(self) -> bool:
        """Whether a stream should end with a usage chunk."""
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def check_supported(self) -> None:
        """Raise InvalidParameterError for a well-formed request this server cannot serve."""
        if self.n not in (None, 1):
            message = f"only n=1 is supported (got {self.n}); send one request per choice"
            raise _unsupported("n", message)

    def _sampling(
        self,
        *,
        max_tokens: int | None,
        logprobs: bool,
        top_logprobs: int | None,
        renames: dict[str, str],
        prompt_logprobs: int | None = None,
    ) -> RequestedSampling:
        self.check_supported()
        requested = {
            "max_tokens": max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "repetition_penalty": self.repetition_penalty,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
        }
        return RequestedSampling.of(
            requested,
            default_max_tokens=self._default_max_tokens,
            renames=renames,
            # Negative seeds are valid int64 seeds for OpenAI; the engine wants 0..2**63-1.
            seed=self.seed & (2**63 - 1) if self.seed is not None else None,
            stop=(self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ()),
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos,
            logit_bias=_logit_bias(self.logit_bias),
            logprobs=logprobs,
            top_logprobs=top_logprobs,
            prompt_logprobs=prompt_logprobs,
        )


def _unsupported(param: str, message: str) -> InvalidParameterError:
    return InvalidParameterError(param, f"{message} (not supported by mlxserve)")


def _logit_bias(bias: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
    pairs: dict[int, float] = {}
    for key, value in (bias or {}).items():
        try:
            token = int(key)
        except ValueError:
            token = -1
        if token < 0:
            raise InvalidParameterError(
                "logit_bias", f"keys must be token ids (non-negative integers), got {key!r}"
            )
        pairs[token] = value
    return tuple(pairs.items())


class ChatCompletionRequest(_SamplingRequest):
    """A ``POST /v1/chat/completions`` body."""

    messages: Annotated[list[ChatMessage], at_most(MAX_MESSAGES)] = Field(min_length=1)
    max_completion_tokens: Int | None = None
    logprobs: bool | None = False
    top_logprobs: Int | None = None
    tools: list[ChatTool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = None
    reasoning_effort: ReasoningEffort | None = Field(
        None,
        description="Passed to the chat template as reasoning_effort; 'none' also sets "
        "enable_thinking false.",
    )
    chat_template_kwargs: TemplateKwargs | None = Field(
        None,
        description="Extra variables for the chat template's render, e.g. "
        '{"enable_thinking": false}.',
    )

    def check_supported(self) -> None:
        """Raise InvalidParameterError for a well-formed request this server cannot serve."""
        super().check_supported()
        if self.functions:
            raise _unsupported("functions", "the deprecated functions field; send tools")

    def sampling(self) -> RequestedSampling:
        """The sampling asked for, checked; unset values fall back to the model's entry, then
        to its family's defaults, then to built-in ones."""
        if self.top_logprobs and not self.logprobs:
            raise InvalidParameterError("top_logprobs", "needs logprobs to be true")
        wanted = self.max_completion_tokens
        renames = {"max_tokens": "max_completion_tokens"} if wanted is not None else {}
        return self._sampling(
            max_tokens=wanted if wanted is not None else self.max_tokens,
            logprobs=bool(self.logprobs),
            top_logprobs=self.top_logprobs,
            renames=renames,
        )

    def conversation(self) -> Conversation:
        """The request as the shared pipeline's conversation."""
        return Conversation(
            messages=self.prompt_messages(),
            tools=self.tool_dicts(),
            tool_choice=self.tool_choice_name(),
            parallel_tool_calls=self.parallel_tool_calls is not False,
            response_format=self.response_format,
            template_kwargs=template_kwargs(
                self.chat_template_kwargs, effort=self.reasoning_effort
            ),
        )

    def prompt_messages(self) -> list[dict[str, Any]]:
        """Return the messages as plain dicts for a chat template; ``developer`` becomes system."""
        messages = []
        for message in self.messages:
            role = "system" if message.role == "developer" else message.role
            entry: dict[str, Any] = {"role": role, "content": message.text()}
            if message.name is not None:
                entry["name"] = message.name
            if message.tool_calls:
                entry["tool_calls"] = [
                    call.model_dump(exclude_unset=False) for call in message.tool_calls
                ]
            if message.tool_call_id is not None:
                entry["tool_call_id"] = message.tool_call_id
            messages.append(entry)
        return messages

    def tool_dicts(self) -> list[dict[str, Any]]:
        """The tools as OpenAI function-tool dicts."""
        return [tool.model_dump(exclude_none=True) for tool in self.tools or ()]

    def tool_choice_name(self) -> str:
        """``tool_choice`` as "none", "auto", "required" or the one function's name."""
        if isinstance(self.tool_choice, NamedToolChoice):
            return self.tool_choice.function.get("name", "")
        return self.tool_choice or ("auto" if self.tools else "none")


class CompletionRequest(_SamplingRequest):
    """A ``POST /v1/completions`` body; ``prompt`` is normalized to one string or id list."""

    _default_max_tokens: ClassVar[int | None] = 16

    prompt: Text | list[TokenId]
    logprobs: Int | None = None
    echo: bool = Field(
        False,
        description="Return the prompt before its continuation, with its tokens' log "
        "probabilities when logprobs is set (the first token's are null); with max_tokens 0 "
        "the prompt alone, scored.",
    )
    suffix: str | None = None
    best_of: Int | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, prompt: Any) -> Any:
        if not isinstance(prompt, list):
            return prompt
        if not prompt:
            raise PydanticCustomError("empty_prompt", "prompt must not be an empty list")
        if all(isinstance(item, (str, list)) for item in prompt):
            if len(prompt) > 1:
                raise PydanticCustomError(
                    "unsupported_prompt",
                    "only one prompt per request is supported (got {count}); "
                    "send one request per prompt",
                    {"count": len(prompt)},
                )
            prompt = prompt[0]
            if prompt == []:
                raise PydanticCustomError("empty_prompt", "prompt must not be an empty list")
        return prompt

    def check_supported(self) -> None:
        """Raise InvalidParameterError for a well-formed request this server cannot serve."""
        super().check_supported()
        if self.best_of not in (None, 1):
            raise _unsupported("best_of", f"only best_of=1 is supported (got {self.best_of})")
        if self.suffix:
            raise _unsupported("suffix", "insertion after a suffix is not available")

    def raw_prompt(self) -> RawPrompt:
        """The request as the shared pipeline's input: its prompt, continued as it is."""
        return RawPrompt(self.prompt, self.response_format)

    def sampling(self) -> RequestedSampling:
        """The sampling asked for, checked; unset values fall back to the model's entry, then
        to its family's defaults, then to built-in ones (max_tokens 16).

        With ``echo``, the prompt is scored when ``logprobs`` asks for log probabilities, and
        when ``max_tokens`` is 0 (then the request is the scoring alone)."""
        scored = self.echo and (self.logprobs is not None or self.max_tokens == 0)
        return self._sampling(
            max_tokens=self.max_tokens,
            logprobs=self.logprobs is not None,
            top_logprobs=self.logprobs,
            renames={"top_logprobs": "logprobs", "prompt_logprobs": "logprobs"},
            prompt_logprobs=(self.logprobs or 0) if scored else None,
        )


# --- responses ---------------------------------------------------------------------------------


class PromptTokensDetails(_Response):
    """Breakdown of the prompt tokens."""

    cached_tokens: int = 0


class CompletionTokensDetails(_Response):
    """Breakdown of the completion tokens."""

    reasoning_tokens: int = 0


class UsageInfo(_Response):
    """Token counts of a request."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None
    completion_tokens_details: CompletionTokensDetails | None = None


class Timings(_Response):
    """Speed of a request (mlxserve extension, sent as ``timings``)."""

    ttft_s: float = Field(description="Seconds from arrival to the first generated token.")
    tokens_per_s: float = Field(description="Generation speed, in tokens per second.")
    prompt_tokens_per_s: float | None = Field(
        None, description="Prompt processing speed, in tokens per second."
    )
    draft_tokens: int | None = Field(
        None, description="Tokens drafted for it by speculative decoding (absent: none)."
    )
    accepted_tokens: int | None = Field(
        None, description="Of the drafted tokens, those verification accepted."
    )
    acceptance_rate: float | None = Field(
        None, description="accepted_tokens / draft_tokens (absent when nothing was drafted)."
    )


class TopLogprob(_Response):
    """One of the most likely tokens at a position."""

    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatCompletionLogprob(TopLogprob):
    """Log probability of one generated token and its top alternatives."""

    top_logprobs: list[TopLogprob] = []


class ChoiceLogprobs(_Response):
    """Log probabilities of a chat choice."""

    _keep_none = frozenset({"content"})

    content: list[ChatCompletionLogprob] | None = None


class CompletionLogprobs(_Response):
    """Log probabilities of a text completion choice, in the legacy shape (an echoed prompt's
    first token has none: null)."""

    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class ResponseFunctionCall(_Response):
    """The function a generated tool call calls; ``arguments`` is JSON text."""

    name: str | None = None
    arguments: str = ""


class ResponseToolCall(_Response):
    """A tool call the model made."""

    id: str
    type: Literal["function"] = "function"
    function: ResponseFunctionCall


class DeltaToolCall(_Response):
    """A tool call in a streamed chunk: ``index`` says which call it belongs to."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: ResponseFunctionCall


class ChatResponseMessage(_Response):
    """The generated message of a chat choice; ``reasoning_content`` is a thinking model's
    reasoning, apart from its answer."""

    _keep_none = frozenset({"content"})

    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ResponseToolCall] | None = None


class ChatCompletionChoice(_Response):
    """One choice of a chat completion."""

    _keep_none = frozenset({"finish_reason", "logprobs"})

    index: int = 0
    message: ChatResponseMessage
    finish_reason: FinishReason | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionResponse(_Response):
    """A chat completion."""

    id: str = Field(default_factory=lambda: new_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None
    timings: Timings | None = None


class DeltaMessage(_Response):
    """The new part of a streamed chat message."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChunkChoice(_Response):
    """One choice of a streamed chat completion chunk."""

    _keep_none = frozenset({"finish_reason", "logprobs"})

    index: int = 0
    delta: DeltaMessage
    finish_reason: FinishReason | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(_Response):
    """One server-sent event of a streamed chat completion."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChunkChoice] = []
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None
    timings: Timings | None = None


class CompletionChoice(_Response):
    """One choice of a text completion, whole or streamed."""

    _keep_none = frozenset({"finish_reason", "logprobs"})

    index: int = 0
    text: str
    finish_reason: FinishReason | None = None
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(_Response):
    """A text completion."""

    id: str = Field(default_factory=lambda: new_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None
    timings: Timings | None = None


class CompletionChunk(_Response):
    """One server-sent event of a streamed text completion."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionChoice] = []
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None
    timings: Timings | None = None


class ModelCard(_Response):
    """One entry of ``GET /v1/models``."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "mlxserve"
    aliases: list[str] = Field([], description="Other names this model answers to.")
    loaded: bool = Field(False, description="Whether the weights are in memory now.")
    family: str | None = Field(None, description="The plugin family that runs this model.")
    random_weights: bool = Field(
        False, description="A tiny test model with random weights: its output is gibberish."
    )
    description: str | None = Field(
        None,
        description="What the model is, when mlxserve knows: e.g. its name, size and "
        "quantization, for a built-in model or a converted GGUF file.",
    )


class ModelList(_Response):
    """The ``GET /v1/models`` body."""

    object: Literal["list"] = "list"
    data: list[ModelCard] = []


def sse(data: BaseModel | dict[str, Any] | str) -> str:
    """Format one server-sent event; a string (such as ``[DONE]``) is sent as is."""
    if isinstance(data, BaseModel):
        payload = data.model_dump_json()
    elif isinstance(data, dict):
        payload = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    else:
        payload = data
    return f"data: {payload}\n\n"
