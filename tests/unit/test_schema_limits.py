"""A JSON schema's limits, checked before compiling (depth following $refs, nesting, nodes,
size, refs, properties, defs, patternProperties, no finite value), by a walk that is bounded
whatever the schema; and the compile pool's time limit. (Schemas against a real server, and
compiles on small stacks in fresh interpreters: process/test_grammar_safety.py.)"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest

from mlxserve.core.errors import QueueFullError
from mlxserve.core.sampling.constraint import CompilePool, GrammarTimeoutError
from mlxserve.core.sampling.grammar_limits import SchemaError, check_schema

from ..support.schemas import MUTUAL_REQUIRED, SELF_REQUIRED, TREE, chain, nested_chain

# ---- the limits themselves ---------------------------------------------------------------


def wide(n: int, each: Callable[[int], Any]) -> dict[str, Any]:
    return {"type": "object", "properties": {f"p{i}": each(i) for i in range(n)}}


def nested(n: int) -> Any:
    value: Any = {"type": "integer"}
    for _ in range(n):
        value = {"type": "array", "items": value}
    return value


@pytest.mark.parametrize(
    ("schema", "words"),
    [
        (chain(3000), "too deep"),
        (nested_chain(200), "too deep"),
        (nested(70), "more than 64 deep"),
        (wide(5001, lambda i: True), "5,000 properties"),
        (wide(10, lambda i: {"enum": [[i]] * 2500}), "20,000 objects and arrays"),
        ({"type": "string", "enum": ["x" * 1000] * 600}, "bytes"),
        (wide(1001, lambda i: {"$ref": "#/$defs/d"}) | {"$defs": {"d": {}}}, "1,000 $refs"),
        ({"$defs": {f"d{i}": {} for i in range(1001)}}, "1,000 $defs"),
        ({"patternProperties": {f"^p{i}$": {} for i in range(65)}}, "64 patternProperties"),
        (
            {
                "$defs": {
                    f"o{j}": {"patternProperties": {f"^{j}p{i}$": {} for i in range(60)}}
                    for j in range(5)
                }
            },
            "256 patternProperties",
        ),
        ({"x-guidance": "compact"}, "x-guidance must be an object"),
        ({"anyOf": [{"x-guidance": 3}]}, "x-guidance must be an object"),
        (SELF_REQUIRED, "admits no finite value"),
        (MUTUAL_REQUIRED, "admits no finite value"),
        ({"$ref": "#"}, "admits no finite value"),
        ({"allOf": [{"$ref": "#"}]}, "admits no finite value"),
        ({"type": "array", "prefixItems": [{"$ref": "#"}], "minItems": 1}, "admits no finite"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_each_limit_is_refused_by_name(schema: Any, words: str) -> None:
    with pytest.raises(SchemaError, match=words.replace("$", r"\$")):
        check_schema(schema)


@pytest.mark.parametrize(
    "schema",
    [
        TREE,
        {"type": "object", "properties": {"next": {"$ref": "#"}}},  # a linked list
        {"anyOf": [{"type": "null"}, {"type": "array", "items": {"$ref": "#"}, "minItems": 1}]},
        {"properties": {"a": {"$ref": "#"}}, "required": ["a"]},  # no type: a number will do
        {"$ref": "#node", "$defs": {"n": {"$anchor": "node", "type": "integer"}}},
        {"$ref": "#/$defs/a%20b", "$defs": {"a b": {"type": "integer"}}},
        {"properties": {"x-guidance": {"type": "integer"}}, "x-guidance": {"lenient": True}},
        chain(390),
        nested_chain(120),
        wide(4900, lambda i: {"type": "string"}),
    ],
)
def test_schemas_within_the_limits_pass(schema: Any) -> None:
    check_schema(schema)


def test_the_walk_is_bounded_whatever_the_schema() -> None:
    deep: Any = 1
    for _ in range(100_000):  # far past Python's recursion limit
        deep = [deep]
    start = time.monotonic()
    with pytest.raises(SchemaError, match="64 deep"):
        check_schema({"enum": [deep]})
    ring = {"$defs": {f"d{i}": {"$ref": f"#/$defs/d{(i + 1) % 999}"} for i in range(999)}}
    with pytest.raises(SchemaError, match="too deep"):
        check_schema(ring)  # one cycle of 999 $refs: its levels all count
    check_schema(wide(4900, lambda i: {"type": "object", "items": [{"a": [1]}]}))
    assert time.monotonic() - start < 5


# ---- compiling: a time limit, a bounded pool ----------------------------------------------


def test_a_compile_past_its_time_limit_is_given_up_and_cannot_hold_the_pool() -> None:
    pool = CompilePool(threads=1, timeout_s=0.3, queue_wait_s=0.6, max_stuck=1)

    async def scenario() -> None:
        start = time.monotonic()
        with pytest.raises(GrammarTimeoutError, match="longer than 0.3 s"):
            await pool.run(lambda: time.sleep(2.0))
        assert time.monotonic() - start < 1.5
        assert await pool.run(lambda: 42) == 42  # its thread was replaced
        with pytest.raises(GrammarTimeoutError):
            await pool.run(lambda: time.sleep(2.0))
        # two stuck, one more than may be replaced: nothing is free, and waiting is bounded
        with pytest.raises(QueueFullError):
            await pool.run(lambda: 1)
        await asyncio.sleep(2.0)  # the stuck compiles end: their threads serve again
        assert await pool.run(lambda: 7) == 7
        assert (pool.healthy, pool.stuck) == (1, 0)

    asyncio.run(scenario())
