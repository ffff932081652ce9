"""Structured output: a request's ``response_format`` as the grammar its output must follow."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from mlxserve.core.sampling.constraint import json_grammar
from mlxserve.core.sampling.grammar_limits import SchemaBudget, SchemaError, check_schema
from mlxserve.core.sampling.json_bounds import bounded_object_schema, bounded_tool_schema
from mlxserve.core.sampling.params import InvalidParameterError

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
    if schema is None:
        return None
    try:
        check_schema(schema)
    except SchemaError as exc:
        raise _invalid(f"json_schema.schema: {exc}") from None
    return dict(schema)


def check_tool_schemas(tools: Sequence[Any], names: list[str] | None = None) -> None:
    """Check the ``parameters`` of the function tools whose calls a grammar will force
    (``names``: only those tools; all by default) against the schema limits, all of them
    sharing one budget. Tools that are not function tools are skipped.

    Raises:
        InvalidParameterError: (param ``tools[i].function.parameters``) the first that fails;
            the message names the tool.
    """
    budget = SchemaBudget()
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(function, Mapping):
            continue
        name = function.get("name")
        if names is not None and name not in names:
            continue
        parameters = function.get("parameters")
        if parameters is None:
            continue
        param = f"tools[{i}].function.parameters"
        if not isinstance(parameters, Mapping):
            raise InvalidParameterError(param, f"tool {name!r}: must be a JSON Schema object")
        try:
            check_schema(parameters, budget)
        except SchemaError as exc:
            raise InvalidParameterError(param, f"tool {name!r}: {exc}") from None


def bounded_tools(tools: Sequence[Any], *, closed: bool) -> list[dict[str, Any]]:
    """Copies of the function tools whose calls a grammar forces, each ``parameters`` rewritten
    so its arguments end (:func:`mlxserve.core.sampling.json_bounds.bounded_tool_schema`;
    ``closed``: an object schema that declares properties allows only those). Check them
    first (:func:`check_tool_schemas`)."""
    out = []
    for tool in tools:
        function = dict(tool["function"])
        function["parameters"] = bounded_tool_schema(function.get("parameters"), closed=closed)
        out.append({**tool, "function": function})
    return out


def grammar_for_response_format(response_format: Mapping[str, Any] | None) -> str | None:
    """The Lark grammar a ``response_format`` asks for; None for plain text.

    ``json_object`` is any JSON object, bounded so that it ends
    (:func:`mlxserve.core.sampling.json_bounds.bounded_object_schema`); ``json_schema`` is
    one JSON value conforming to its ``schema`` (any JSON object if it has none). The schema
    is checked against the limits of :mod:`mlxserve.core.sampling.grammar_limits` here;
    whether it compiles is found out when the grammar is compiled (``admit``), off the event
    loop.

    Raises:
        InvalidParameterError: (param ``response_format``) it is not one of the three forms,
            or its schema passes a limit (the message says which).
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
        return json_grammar(bounded_object_schema())
    if "json_schema" not in response_format:
        raise _invalid("type 'json_schema' needs a 'json_schema' object")
    return json_grammar(_schema(response_format["json_schema"]))
