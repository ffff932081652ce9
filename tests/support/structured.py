"""Structured output's shared pieces: a pet's JSON schema, the response_format asking for it,
and a chat helper giving a completion's text and finish reason, streamed or not."""

from __future__ import annotations

from typing import Any

import openai

from .server import RunningServer

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "kind": {"enum": ["cat", "dog", "fox"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {
            "type": "array",
            "items": {"type": "string", "maxLength": 5},
            "minItems": 1,
            "maxItems": 3,
        },
        "owner": {
            "type": "object",
            "properties": {
                "id": {"type": "integer", "minimum": 1, "maximum": 999},
                "active": {"type": "boolean"},
            },
            "required": ["id", "active"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "kind", "age", "tags", "owner"],
    "additionalProperties": False,
}
RESPONSE_FORMAT = {
    "type": "json_schema",
    "json_schema": {"name": "pet", "schema": SCHEMA, "strict": True},
}
MESSAGES = [{"role": "user", "content": "Describe a pet as JSON."}]
MAX_TOKENS = 400  # far more than the schema's longest value takes


def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


def chat(
    server: RunningServer, model: str, stream: bool = False, **params: Any
) -> tuple[str, str | None]:
    """The text and finish reason of a chat completion, streamed or not."""
    params = {"max_tokens": MAX_TOKENS, "response_format": RESPONSE_FORMAT} | params
    api = client(server).chat.completions
    if not stream:
        choice = api.create(model=model, messages=MESSAGES, **params).choices[0]
        return choice.message.content or "", choice.finish_reason
    text, reason = "", None
    for chunk in api.create(model=model, messages=MESSAGES, stream=True, **params):
        for choice in chunk.choices:
            text += choice.delta.content or ""
            reason = choice.finish_reason or reason
    return text, reason
