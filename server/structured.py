"""Structured output: a request's ``response_format`` as the grammar its output must follow."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mlxserve.core.constraint import json_grammar
from mlxserve.core.sampling import InvalidParameterError

FORMATS = ("text", "json_object", "json_schema")


def _invalid(message: str) -> InvalidParameterError:
    return InvalidParameterError("response_format", message)


def _schema(spec: Any) -> dict[str, Any] | None:
    if not isinstance(spec, Mapping):
        raise _invalid("json_schema must be an object with a 'schema' (and a 'name')")
    for key in ("name", "description"):
        if key in spec and not isinstance(spec[key], str):
            raise _invalid(f"json_schema.{key} must be a string")
    if "strict" in spec and not isinstance(spec["strict"], bool | None):
        raise _invalid("json_schema.strict must be true or false")
    schema = spec.get("schema")
    if schema is not None and not isinstance(schema, Mapping):
        raise _invalid("json_schema.schema must be a JSON Schema object")
    return None if schema is None else dict(schema)


def grammar_for_response_format(response_format: Mapping[str, Any] | None) -> str | None:
    """The Lark grammar a ``response_format`` asks for; None for plain text.

    ``json_object`` is any JSON object; ``json_schema`` is one JSON value conforming to its
    ``schema`` (any JSON object if it has none). Whether the schema compiles is found out
    when the grammar is compiled (``admit``), off the event loop.

    Raises:
        InvalidParameterError: (param ``response_format``) it is not one of the three forms.
    """
    if response_format is None:
        return None
    kind = response_format.get("type")
    if kind not in FORMATS:
        allowed = ", ".join(repr(f) for f in FORMATS)
        raise _invalid(f"type must be one of {allowed}, not {kind!r}")
    if kind == "text":
        return None
    if kind == "json_object":
        return json_grammar(None)
    if "json_schema" not in response_format:
        raise _invalid("type 'json_schema' needs a 'json_schema' object")
    return json_grammar(_schema(response_format["json_schema"]))
