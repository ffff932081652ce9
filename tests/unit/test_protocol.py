"""The OpenAI wire schemas: request mapping, validation, and parsing by the official client."""

from __future__ import annotations

import json
from typing import Any

import openai.types
import openai.types.chat
import pytest
from pydantic import ValidationError

from mlxserve.core.config.schema import ModelEntry
from mlxserve.core.sampling.params import InvalidParameterError, SamplingParams
from mlxserve.server.protocol.openai import (
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionLogprob,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatResponseMessage,
    ChoiceLogprobs,
    ChunkChoice,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    Timings,
    TopLogprob,
    UsageInfo,
    error_body,
    new_id,
    sse,
)

USER = [{"role": "user", "content": "Hi"}]


def chat(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": USER, **fields})


def completion(**fields: Any) -> CompletionRequest:
    return CompletionRequest.model_validate({"prompt": "Once", **fields})


def sampling_params(
    request: ChatCompletionRequest | CompletionRequest,
    entry: ModelEntry | None = None,
    family: dict[str, float] | None = None,
) -> SamplingParams:
    """What ``request`` samples with on a model of this entry and family defaults."""
    entry_defaults = entry.sampling_defaults if entry is not None else {}
    return request.sampling().with_defaults(entry_defaults, family or {})


def param_of(request: ChatCompletionRequest | CompletionRequest) -> str:
    with pytest.raises(InvalidParameterError) as caught:
        sampling_params(request)
    return caught.value.param


# --- requests ----------------------------------------------------------------------------------


def test_request_value_beats_model_entry_which_beats_sampling_defaults() -> None:
    entry = ModelEntry(source="builtin:tiny", temperature=0.2, top_k=40, max_tokens=64)
    params = sampling_params(chat(temperature=0.9), entry)
    assert (params.temperature, params.top_k, params.max_tokens) == (0.9, 40, 64)
    assert params.top_p == SamplingParams().top_p
    assert sampling_params(chat()) == SamplingParams()


def test_model_entry_beats_family_defaults_which_beat_built_in_ones() -> None:
    family = {"temperature": 0.0, "top_k": 5, "presence_penalty": 0.5}
    entry = ModelEntry(source="builtin:tiny", temperature=0.3)
    params = sampling_params(chat(), entry, family)
    assert (params.temperature, params.top_k, params.presence_penalty) == (0.3, 5, 0.5)
    params = sampling_params(chat(top_k=9, presence_penalty=0), entry, family)
    assert (params.top_k, params.presence_penalty) == (9, 0)
    assert sampling_params(chat(), None, family).temperature == 0.0
    assert sampling_params(completion(), None, family).top_k == 5


def test_negative_seeds_map_into_the_engine_range() -> None:
    assert sampling_params(chat(seed=-1)).seed == 2**63 - 1
    assert sampling_params(chat(seed=2**63 - 1)).seed == 2**63 - 1
    assert sampling_params(chat(seed=0)).seed == 0


@pytest.mark.parametrize(
    ("fields", "loc"),
    [
        ({"max_tokens": True}, "max_tokens"),
        ({"temperature": False}, "temperature"),
        ({"top_k": "3"}, "top_k"),
        ({"seed": 2**63}, "seed"),
        ({"stop_token_ids": [0] * 65}, "stop_token_ids"),
        ({"logit_bias": {str(i): 0 for i in range(301)}}, "logit_bias"),
        ({"stop": ["a"] * 17}, "stop"),
        ({"user": "\ud800"}, "user"),
    ],
)
def test_wire_types_are_strict(fields: dict[str, Any], loc: str) -> None:
    with pytest.raises(ValidationError) as caught:
        chat(**fields)
    assert caught.value.errors()[0]["loc"][0] == loc


def test_ints_are_taken_for_float_fields() -> None:
    assert sampling_params(chat(temperature=1, top_p=1)).temperature == 1.0


def test_top_logprobs_needs_logprobs() -> None:
    assert param_of(chat(top_logprobs=3)) == "top_logprobs"
    assert sampling_params(chat(logprobs=True, top_logprobs=3)).top_logprobs == 3


def test_error_bodies_escape_lone_surrogates() -> None:
    body = error_body("bad \ud800 input", param="x\udfff")
    assert json.dumps(body, ensure_ascii=False).encode()
    assert body["error"]["message"] == "bad \\ud800 input"


def test_unknown_fields_are_ignored() -> None:
    assert sampling_params(chat(parallel_tool_calls=False, store=True)) == SamplingParams()


def test_max_completion_tokens_wins_over_max_tokens() -> None:
    entry = ModelEntry(source="builtin:tiny", max_tokens=64)
    assert sampling_params(chat(max_tokens=5, max_completion_tokens=7)).max_tokens == 7
    assert sampling_params(chat(max_tokens=5), entry).max_tokens == 5
    assert param_of(chat(max_completion_tokens=0)) == "max_completion_tokens"


def test_completion_max_tokens_defaults_to_16_after_the_model_entry() -> None:
    assert sampling_params(completion()).max_tokens == 16
    entry = ModelEntry(source="builtin:tiny", max_tokens=64)
    assert sampling_params(completion(), entry).max_tokens == 64
    assert sampling_params(completion(max_tokens=3), entry).max_tokens == 3


def test_stop_string_becomes_a_tuple() -> None:
    assert sampling_params(chat(stop="\n")).stop == ("\n",)
    assert sampling_params(chat(stop=["a", "b"])).stop == ("a", "b")
    assert sampling_params(chat(stop=None)).stop == ()


def test_other_fields_map_to_sampling_params() -> None:
    params = sampling_params(
        chat(
            seed=7,
            min_p=0.1,
            presence_penalty=0.5,
            frequency_penalty=-0.5,
            repetition_penalty=1.1,
            logit_bias={"5": 10, "9": -100},
            ignore_eos=True,
            stop_token_ids=[2, 3],
            logprobs=True,
            top_logprobs=4,
        )
    )
    assert params.seed == 7 and params.min_p == 0.1 and params.ignore_eos
    assert (params.presence_penalty, params.frequency_penalty) == (0.5, -0.5)
    assert params.repetition_penalty == 1.1
    assert params.logit_bias == ((5, 10.0), (9, -100.0))
    assert params.stop_token_ids == (2, 3)
    assert params.logprobs and params.top_logprobs == 4


def test_completion_logprobs_int_means_top_logprobs() -> None:
    params = sampling_params(completion(logprobs=3))
    assert params.logprobs and params.top_logprobs == 3
    params = sampling_params(completion(logprobs=0))
    assert params.logprobs and params.top_logprobs == 0
    assert not sampling_params(completion()).wants_logprobs
    assert param_of(completion(logprobs=21)) == "logprobs"


def test_echo_scores_the_prompt_when_asked_or_when_nothing_is_generated() -> None:
    assert sampling_params(completion(echo=True, logprobs=3)).prompt_logprobs == 3
    assert sampling_params(completion(echo=True, logprobs=0, max_tokens=0)).prompt_logprobs == 0
    assert sampling_params(completion(echo=True, max_tokens=0)).prompt_logprobs == 0
    assert sampling_params(completion(echo=True, max_tokens=5)).prompt_logprobs is None
    assert sampling_params(completion(logprobs=3)).prompt_logprobs is None


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"n": 2}, "n"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"logit_bias": {"token": 1}}, "logit_bias"),
        ({"logit_bias": {"-1": 1}}, "logit_bias"),
        ({"logit_bias": {"1": 101}}, "logit_bias"),
        ({"temperature": 101}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"stop": [""]}, "stop"),
        ({"temperature": float("nan")}, "temperature"),
    ],
)
def test_chat_rejects_with_the_parameter_name(fields: dict[str, Any], param: str) -> None:
    assert param_of(chat(**fields)) == param


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"n": 3}, "n"),
        ({"best_of": 2}, "best_of"),
        ({"suffix": "x"}, "suffix"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"echo": True, "logprobs": 21}, "logprobs"),
        ({"max_tokens": 0, "logprobs": 2}, "max_tokens"),
    ],
)
def test_completion_rejects_with_the_parameter_name(fields: dict[str, Any], param: str) -> None:
    assert param_of(completion(**fields)) == param


def test_accepted_no_op_settings() -> None:
    request = chat(n=1, tool_choice="none", response_format={"type": "text"}, tools=[])
    sampling_params(request)
    sampling_params(completion(n=1, best_of=1, echo=False, suffix=""))


def test_text_content_parts_are_joined() -> None:
    parts = [{"type": "text", "text": "Hello"}, {"type": "text", "text": "world"}]
    request = chat(
        messages=[{"role": "developer", "content": "Be brief"}, {"role": "user", "content": parts}]
    )
    assert request.messages[1].text() == "Hello\nworld"
    assert request.prompt_messages() == [
        {"role": "system", "content": "Be brief"},
        {"role": "user", "content": "Hello\nworld"},
    ]
    assert chat(messages=[{"role": "assistant", "content": None}]).messages[0].text() == ""


def test_image_content_part_is_rejected() -> None:
    image = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
    with pytest.raises(ValidationError) as caught:
        chat(messages=[{"role": "user", "content": [{"type": "text", "text": "?"}, image]}])
    (error,) = caught.value.errors()
    assert error["loc"] == ("messages", 0, "content")
    assert "'image_url' content parts are not supported" in error["msg"]


@pytest.mark.parametrize(
    "fields",
    [{"messages": []}, {"messages": [{"role": "robot", "content": "x"}]}, {"temperature": "hot"}],
)
def test_malformed_chat_requests_fail_validation(fields: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        chat(**fields)


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [("Once", "Once"), ([1, 2, 3], [1, 2, 3]), (["Once"], "Once"), ([[4, 5]], [4, 5])],
)
def test_completion_prompt_forms(prompt: Any, expected: str | list[int]) -> None:
    assert CompletionRequest(prompt=prompt).prompt == expected


@pytest.mark.parametrize("prompt", [["a", "b"], [[1], [2]], [], [[]], [1, -2], None])
def test_completion_rejects_other_prompts(prompt: Any) -> None:
    with pytest.raises(ValidationError) as caught:
        CompletionRequest(prompt=prompt)
    assert caught.value.errors()[0]["loc"][0] == "prompt"


# --- responses and the official client ---------------------------------------------------------


def usage() -> UsageInfo:
    return UsageInfo(
        prompt_tokens=5,
        completion_tokens=2,
        total_tokens=7,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=4),
    )


def as_json(model: Any) -> dict[str, Any]:
    return json.loads(model.model_dump_json())


def test_chat_response_parses_with_openai() -> None:
    top = TopLogprob(token="Hi", logprob=-0.1, bytes=[72, 105])
    logprobs = ChoiceLogprobs(
        content=[ChatCompletionLogprob(**top.model_dump(), top_logprobs=[top])]
    )
    response = ChatCompletionResponse(
        model="demo",
        choices=[
            ChatCompletionChoice(
                message=ChatResponseMessage(content="Hi!"), finish_reason="stop", logprobs=logprobs
            )
        ],
        usage=usage(),
        timings=Timings(ttft_s=0.05, tokens_per_s=40.0),
    )
    parsed = openai.types.chat.ChatCompletion.model_validate(as_json(response))
    assert parsed.id.startswith("chatcmpl-") and parsed.object == "chat.completion"
    assert parsed.choices[0].message.content == "Hi!"
    assert parsed.choices[0].logprobs.content[0].top_logprobs[0].bytes == [72, 105]
    assert parsed.usage.prompt_tokens_details.cached_tokens == 4
    assert parsed.model_extra["timings"]["tokens_per_s"] == 40.0


def test_chat_chunks_parse_with_openai_and_keep_finish_reason_null() -> None:
    chunk_id = new_id("chatcmpl")
    chunks = [
        ChatCompletionChunk(
            id=chunk_id,
            model="demo",
            choices=[ChunkChoice(delta=DeltaMessage(role="assistant", content=""))],
        ),
        ChatCompletionChunk(
            id=chunk_id, model="demo", choices=[ChunkChoice(delta=DeltaMessage(content="Hi"))]
        ),
        ChatCompletionChunk(
            id=chunk_id,
            model="demo",
            choices=[ChunkChoice(delta=DeltaMessage(), finish_reason="length")],
        ),
        ChatCompletionChunk(id=chunk_id, model="demo", usage=usage()),
    ]
    wire = [as_json(chunk) for chunk in chunks]
    assert wire[1]["choices"][0] == {
        "index": 0,
        "delta": {"content": "Hi"},
        "finish_reason": None,
        "logprobs": None,
    }
    assert wire[2]["choices"][0]["delta"] == {}
    assert "usage" not in wire[0] and wire[3]["choices"] == []
    parsed = [openai.types.chat.ChatCompletionChunk.model_validate(data) for data in wire]
    assert parsed[0].choices[0].delta.role == "assistant"
    assert parsed[2].choices[0].finish_reason == "length"
    assert parsed[3].usage.total_tokens == 7


def test_completion_response_and_chunks_parse_with_openai() -> None:
    logprobs = CompletionLogprobs(
        tokens=[" upon"], token_logprobs=[-0.2], top_logprobs=[{" upon": -0.2}], text_offset=[4]
    )
    choice = CompletionChoice(text=" upon", finish_reason="length", logprobs=logprobs)
    response = CompletionResponse(model="demo", choices=[choice], usage=usage())
    parsed = openai.types.Completion.model_validate(as_json(response))
    assert parsed.object == "text_completion" and parsed.id.startswith("cmpl-")
    assert parsed.choices[0].logprobs.top_logprobs == [{" upon": -0.2}]
    middle = CompletionChunk(id="cmpl-1", model="demo", choices=[CompletionChoice(text=" a")])
    assert as_json(middle)["choices"][0]["finish_reason"] is None
    last = CompletionChunk(id="cmpl-1", model="demo", choices=[choice], usage=usage())
    assert openai.types.Completion.model_validate(as_json(last)).usage.completion_tokens == 2


def test_models_parse_with_openai() -> None:
    card = ModelCard(id="demo", aliases=["tiny"], loaded=True, family="llama", random_weights=True)
    listing = as_json(ModelList(data=[card]))
    assert listing["object"] == "list"
    parsed = openai.types.Model.model_validate(listing["data"][0])
    assert (parsed.id, parsed.object, parsed.owned_by) == ("demo", "model", "mlxserve")
    assert parsed.model_extra["aliases"] == ["tiny"] and parsed.model_extra["loaded"] is True


def test_error_body_and_sse() -> None:
    assert error_body("n must be 1", param="n") == {
        "error": {
            "message": "n must be 1",
            "type": "invalid_request_error",
            "param": "n",
            "code": None,
        }
    }
    assert sse("[DONE]") == "data: [DONE]\n\n"
    assert sse({"a": "é"}) == 'data: {"a":"é"}\n\n'
    event = sse(ChatCompletionChunk(id="c", model="m", created=1))
    assert event.startswith("data: {") and event.endswith("}\n\n")
    assert json.loads(event.removeprefix("data: ")) == {
        "id": "c",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [],
    }
