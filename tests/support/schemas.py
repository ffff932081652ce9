"""JSON schemas at and past the grammar compiler's limits: long $ref chains, objects nested
through $refs, and schemas that require themselves (no finite value) or recurse but can end."""

from __future__ import annotations

from typing import Any


def chain(n: int) -> dict[str, Any]:
    """d0 -> d1 -> ... -> dn = integer: n $refs in a row."""
    defs: dict[str, Any] = {f"d{i}": {"$ref": f"#/$defs/d{i + 1}"} for i in range(n)}
    defs[f"d{n}"] = {"type": "integer"}
    return {"$ref": "#/$defs/d0", "$defs": defs}


def nested_chain(n: int) -> dict[str, Any]:
    """n objects nested through $refs: {"a": {"a": ... 1}}."""
    defs: dict[str, Any] = {
        f"d{i}": {
            "type": "object",
            "properties": {"a": {"$ref": f"#/$defs/d{i + 1}"}},
            "required": ["a"],
        }
        for i in range(n)
    }
    defs[f"d{n}"] = {"type": "integer"}
    return {"$ref": "#/$defs/d0", "$defs": defs}


SELF_REQUIRED = {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]}
MUTUAL_REQUIRED = {
    "$defs": {
        "a": {"type": "object", "properties": {"b": {"$ref": "#/$defs/b"}}, "required": ["b"]},
        "b": {"type": "array", "items": {"$ref": "#/$defs/a"}, "minItems": 1},
    },
    "$ref": "#/$defs/a",
}
TREE = {  # recursive, but a leaf ends it: fine
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 4},
        "children": {"type": "array", "items": {"$ref": "#"}, "maxItems": 2},
    },
    "required": ["name"],
    "additionalProperties": False,
}
