"""JSON Schemas rewritten so that every value the grammar allows has an end.

A forced tool call's arguments and ``json_object`` output are compiled from a JSON Schema
(:func:`mlxserve.core.sampling.constraint.json_grammar`, ``%json`` in Lark). Most schemas allow
values of any size: an open object takes keys forever, a string or a number any number of
characters. A small model then writes until ``max_tokens``, and its call comes back as text.
The rewrites here bound all of that, as far as llguidance 1.9 can express it (measured):

* An object schema that declares ``properties`` and says nothing about other keys is closed
  (``additionalProperties: false``), as OpenAI's strict mode reads it, unless the caller keeps
  it open. llguidance writes declared properties once each, in the schema's order: a closed
  object has no duplicate keys.
* An object used as a map (no ``properties``) and ``json_object`` output: keys of at most
  ``MAX_KEY_LENGTH`` characters, at most ``MAX_OBJECT_KEYS`` of them. llguidance cannot forbid a
  repeated key among those (it enforces uniqueness only for declared properties, and has no
  ``propertyNames``); the count bounds them.
* Strings without ``maxLength`` (nor ``enum``/``const``) take at most ``MAX_STRING_LENGTH``.
* Numbers without bounds stay within ``±MAX_NUMBER`` (16 integer digits), and a ``number``
  without ``multipleOf`` is a multiple of ``NUMBER_STEP`` (at most 6 decimals): llguidance has
  no other way to end a fraction's digits. Exponents are then not written.
* A value the schema leaves free (``{}``, ``true``, only annotations) is any JSON value nested at
  most ``MAX_NESTING`` objects and arrays deep, arrays of at most ``MAX_ARRAY_ITEMS``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

MAX_STRING_LENGTH = 4000
MAX_KEY_LENGTH = 64
MAX_OBJECT_KEYS = 64
MAX_ARRAY_ITEMS = 64
MAX_NESTING = 4
MAX_NUMBER = 10**15
NUMBER_STEP = 1e-6

ANY = "mlxserve_any"  # the $defs names of the bounded "any value" schemas: mlxserve_any_0...
KEY_PATTERN = f"^.{{1,{MAX_KEY_LENGTH}}}$"

_ANNOTATIONS = frozenset(
    {"description", "title", "default", "examples", "$comment", "deprecated", "readOnly"}
)
_OBJECT_KEYS = ("additionalProperties", "patternProperties", "unevaluatedProperties")
# where a subschema's values are the value's own (not under "not", "if"...: bounding those
# would widen what the schema allows)
_SUBSCHEMAS = ("items", "additionalProperties", "then", "else")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")


def _any_ref(depth: int) -> dict[str, Any]:
    return {"$ref": f"#/$defs/{ANY}_{depth}"}


def _bounded_map(values: Any) -> dict[str, Any]:
    return {
        "patternProperties": {KEY_PATTERN: values},
        "additionalProperties": False,
        "maxProperties": MAX_OBJECT_KEYS,
    }


def _scalars() -> list[dict[str, Any]]:
    return [
        {"type": "string", "maxLength": MAX_STRING_LENGTH},
        {"type": "integer", "minimum": -MAX_NUMBER, "maximum": MAX_NUMBER},
        {
            "type": "number",
            "minimum": -MAX_NUMBER,
            "maximum": MAX_NUMBER,
            "multipleOf": NUMBER_STEP,
        },
        {"type": "boolean"},
        {"type": "null"},
    ]


def any_value_defs() -> dict[str, Any]:
    """``$defs`` of any JSON value, bounded: ``mlxserve_any_N`` nests at most N objects and
    arrays (0: scalars only)."""
    defs: dict[str, Any] = {f"{ANY}_0": {"anyOf": _scalars()}}
    for depth in range(1, MAX_NESTING + 1):
        inner = _any_ref(depth - 1)
        defs[f"{ANY}_{depth}"] = {
            "anyOf": [
                *_scalars(),
                {"type": "array", "items": inner, "maxItems": MAX_ARRAY_ITEMS},
                {"type": "object", **_bounded_map(inner)},
            ]
        }
    return defs


def bounded_object_schema() -> dict[str, Any]:
    """Any JSON object (``json_object``), with every size bounded (see the module)."""
    return {"type": "object", **_bounded_map(_any_ref(MAX_NESTING - 1)), "$defs": any_value_defs()}


def bounded_tool_schema(parameters: Mapping[str, Any] | None, *, closed: bool) -> dict[str, Any]:
    """A tool's ``parameters`` rewritten so its arguments end (see the module); ``closed``:
    object schemas that declare properties allow only those. No parameters: no arguments
    (``{}``) when closed, else any object. The schema is copied, never changed in place; it
    has been checked against :mod:`mlxserve.core.sampling.grammar_limits` (nesting is bounded)."""
    if parameters is None or set(parameters) <= _ANNOTATIONS:
        if closed:
            return {"type": "object", "properties": {}, "additionalProperties": False}
        return bounded_object_schema()
    rewriter = _Rewriter(closed)
    schema: dict[str, Any] = rewriter.schema(parameters)
    if rewriter.used_any:
        schema["$defs"] = {**schema.get("$defs", {}), **any_value_defs()}
    return schema


def _types(schema: Mapping[str, Any]) -> set[str]:
    kind = schema.get("type")
    if isinstance(kind, str):
        return {kind}
    return {k for k in kind if isinstance(k, str)} if isinstance(kind, list) else set()


class _Rewriter:
    def __init__(self, closed: bool) -> None:
        self.closed = closed
        self.used_any = False

    def schema(self, value: Any) -> Any:
        if value is True or (isinstance(value, Mapping) and set(value) <= _ANNOTATIONS):
            self.used_any = True
            return {**(value if isinstance(value, Mapping) else {}), **_any_ref(MAX_NESTING)}
        if not isinstance(value, Mapping):
            return value
        out = dict(value)
        for key in _SUBSCHEMAS:
            if key in out and not (key == "items" and isinstance(out[key], list)):
                out[key] = self.schema(out[key])
        if isinstance(out.get("items"), list):
            out["items"] = [self.schema(s) for s in out["items"]]
        for key in _SCHEMA_LISTS:
            if isinstance(out.get(key), list):
                out[key] = [self.schema(s) for s in out[key]]
        for key in _SCHEMA_MAPS:
            if isinstance(out.get(key), Mapping):
                out[key] = {name: self.schema(s) for name, s in out[key].items()}
        if "enum" in out or "const" in out:
            return out
        types = _types(out)
        if "object" in types or "properties" in out:
            self._object(out)
        if "array" in types and "maxItems" not in out:
            out["maxItems"] = MAX_ARRAY_ITEMS
        if "string" in types and "maxLength" not in out:
            out["maxLength"] = MAX_STRING_LENGTH
        if types & {"integer", "number"}:
            if "minimum" not in out and "exclusiveMinimum" not in out:
                out["minimum"] = -MAX_NUMBER
            if "maximum" not in out and "exclusiveMaximum" not in out:
                out["maximum"] = MAX_NUMBER
            if "number" in types and "multipleOf" not in out:
                out["multipleOf"] = NUMBER_STEP
        return out

    def _object(self, out: dict[str, Any]) -> None:
        if any(key in out for key in _OBJECT_KEYS):
            extra = out.get("additionalProperties")
            if (
                "properties" not in out
                and "patternProperties" not in out
                and isinstance(extra, dict)
            ):
                # a map: its keys and their number bounded, its values as they were
                limit = out.get("maxProperties")
                out.update(_bounded_map(extra))
                if isinstance(limit, int) and limit < MAX_OBJECT_KEYS:
                    out["maxProperties"] = limit
            return
        if "properties" in out:
            if self.closed:
                out["additionalProperties"] = False
            return
        if not any(key in out for key in ("required", "allOf", "anyOf", "oneOf", "$ref")):
            self.used_any = True
            out.update(_bounded_map(_any_ref(MAX_NESTING - 1)))
