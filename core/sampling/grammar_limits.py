"""What a JSON Schema may be before it is compiled into a grammar, checked in Python first.

llguidance compiles a schema recursively on the calling thread's stack: a ``$ref`` chain of
3,000 definitions overflows an 8 MiB stack and ends the process with SIGSEGV. So every schema
a request brings (``response_format``, ``text.format``, a forced tool's ``parameters``) is
first walked here, iteratively, with every count bounded, and refused with a message naming
the limit it passes. The limits, all in one place:

``MAX_SCHEMA_BYTES``
    the schema as compact JSON (all schemas of one request together).
``MAX_SCHEMA_NESTING``
    objects and arrays nested in the schema document (llguidance's own JSON reader stops at
    128; Python's encoder and the walk stay far from their limits too).
``MAX_SCHEMA_DEPTH``
    the longest path the compiler can recurse along, counting every object and array on it,
    each ``$ref`` followed to what it points to. Levels that form a cycle (a recursive
    schema) all count, as if the compiler walked each of them in a row; with a ``$ref``
    that is not a ``#/...`` pointer from the root (an anchor, an ``$id``), every object and
    array of the schema counts. Measured (llguidance 1.9, Linux x86-64) on 12 shapes of
    ``$ref`` chains (bare, through properties, items, prefixItems, additionalProperties,
    anyOf, allOf, merged allOf objects, mixes): 2.2-4.1 KB of stack per level, so 400
    levels take at most ~1.6 MB. Every shape at the limit compiles in a 2 MiB thread stack
    (a quarter of Linux's default 8 MiB, an eighth of the 16 MiB Python gives threads on
    macOS), and grammars are compiled on threads with a far larger one (see
    :mod:`mlxserve.core.sampling.constraint`).
``MAX_SCHEMA_NODES``
    objects and arrays in all schemas of a request: bounds the walk itself.
``MAX_SCHEMA_REFS``
    ``$ref`` keywords.
``MAX_SCHEMA_PROPERTIES``, ``MAX_SCHEMA_DEFINITIONS``
    entries of ``properties``, and of ``$defs``/``definitions``.
``MAX_PATTERN_PROPERTIES``, ``MAX_PATTERN_PROPERTIES_TOTAL``
    ``patternProperties`` of one object, and of all of them: llguidance compares an object's
    patterns pairwise, and the time grows faster than the square (64: 0.02 s, 300: 5-19 s,
    600: 117 s, measured).

Besides the limits, the walk refuses what llguidance would fail on later or badly: an
``x-guidance`` that is not an object at any schema position (only the top-level one takes
effect; nested ones, objects, are left as they are and ignored by llguidance), and a schema
that admits no finite value (``{"properties": {"a": {"$ref": "#"}}, "required": ["a"]}``
compiles, but its output could never end).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

MAX_SCHEMA_BYTES = 512 * 1024
MAX_SCHEMA_NESTING = 64
MAX_SCHEMA_DEPTH = 400
MAX_SCHEMA_NODES = 20_000
MAX_SCHEMA_REFS = 1_000
MAX_SCHEMA_PROPERTIES = 5_000
MAX_SCHEMA_DEFINITIONS = 1_000
MAX_PATTERN_PROPERTIES = 64
MAX_PATTERN_PROPERTIES_TOTAL = 256

# keywords whose value is one subschema, a list of them, or a map of names to them
_ONE = frozenset(
    {
        "additionalProperties",
        "additionalItems",
        "contains",
        "not",
        "if",
        "then",
        "else",
        "propertyNames",
        "unevaluatedItems",
        "unevaluatedProperties",
        "contentSchema",
    }
)
_LIST = frozenset({"allOf", "anyOf", "oneOf", "prefixItems"})
_MAP = frozenset({"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"})
# keywords that make a $ref mean something other than a JSON pointer from the root
_RESOURCE_KEYS = ("$id", "$anchor", "$dynamicAnchor", "$dynamicRef", "$recursiveRef", "id")
_TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")

# what a container is: a schema, a list or map of schemas, or plain data (enum, const...)
_SCHEMA, _SCHEMA_LIST, _SCHEMA_MAP, _DATA = range(4)


class SchemaError(ValueError):
    """A schema passes a limit, or cannot be compiled into a grammar that ends."""


@dataclass
class SchemaBudget:
    """What the schemas of one request have used of the limits (shared by a request's tools)."""

    bytes: int = 0
    nodes: int = 0
    refs: int = 0
    properties: int = 0
    definitions: int = 0
    pattern_properties: int = 0

    def spend(self, what: str, amount: int, limit: int, unit: str) -> None:
        total = getattr(self, what) + amount
        setattr(self, what, total)
        if total > limit:
            raise SchemaError(f"the schema has more than {limit:,} {unit} (the limit)")


def check_schema(schema: Any, budget: SchemaBudget | None = None) -> None:
    """Check one JSON Schema against the limits, before it is compiled.

    Runs in time and memory bounded by the limits whatever the schema (no recursion).

    Raises:
        SchemaError: the message says which limit, or what is wrong.
    """
    budget = SchemaBudget() if budget is None else budget
    walk = _Walk(budget)
    walk.run(schema)  # bounded by MAX_SCHEMA_NODES and MAX_SCHEMA_NESTING as it goes
    size = len(json.dumps(schema, ensure_ascii=False))  # safe: nesting is bounded now
    budget.spend("bytes", size, MAX_SCHEMA_BYTES, "bytes of JSON")
    walk.resolve_refs(schema)
    depth = walk.depth() if walk.refs else walk.deepest  # without $refs: a tree
    if depth > MAX_SCHEMA_DEPTH:
        how = "following its $refs, " if walk.counts.refs else ""
        raise SchemaError(
            f"the schema is too deep: {how}a path through it has {depth:,} levels "
            f"(the limit is {MAX_SCHEMA_DEPTH})"
        )
    counts = walk.counts
    budget.spend("refs", counts.refs, MAX_SCHEMA_REFS, "$refs")
    budget.spend("properties", counts.properties, MAX_SCHEMA_PROPERTIES, "properties")
    budget.spend("definitions", counts.definitions, MAX_SCHEMA_DEFINITIONS, "$defs/definitions")
    budget.spend(
        "pattern_properties",
        counts.pattern_properties,
        MAX_PATTERN_PROPERTIES_TOTAL,
        "patternProperties in all",
    )
    if walk.has_cycle and not walk.admits_a_finite_value():  # (else llguidance can tell)
        raise SchemaError(
            "the schema admits no finite value: it requires itself (a $ref cycle through "
            "required properties, minItems or allOf), so its output could never end"
        )


class _Walk:
    """The containers of a schema as a graph: nesting edges, and $ref edges once resolved."""

    def __init__(self, budget: SchemaBudget) -> None:
        self.budget = budget
        self.counts = SchemaBudget()  # this schema's own, checked once the walk is done
        self.nodes: list[Any] = []  # every dict and list, in walk order; 0 is the root
        self.kinds: list[int] = []
        self.edges: list[list[int]] = []
        self.index: dict[int, int] = {}  # id(container) -> its node
        self.refs: list[tuple[int, str]] = []  # (node holding "$ref", the ref)
        self.targets: dict[int, Any] = {}  # node holding "$ref" -> what it points to
        self.pointer_refs_only = True  # every $ref resolved as a JSON pointer from the root
        self.deepest = 0  # the most nested container's level
        self.has_cycle = False  # known once depth() has run

    def run(self, root: Any) -> None:
        budget = self.budget
        stack: list[tuple[Any, int, int, int]] = [(root, 1, _SCHEMA, -1)]
        while stack:
            value, depth, kind, parent = stack.pop()
            if not isinstance(value, dict | list):
                continue
            if depth > MAX_SCHEMA_NESTING:
                raise SchemaError(
                    f"the schema nests objects and arrays more than {MAX_SCHEMA_NESTING} deep "
                    "(the limit)"
                )
            self.deepest = max(self.deepest, depth)
            budget.nodes += 1
            if budget.nodes > MAX_SCHEMA_NODES:
                raise SchemaError(
                    f"the schema has more than {MAX_SCHEMA_NODES:,} objects and arrays (the limit)"
                )
            node = len(self.nodes)
            self.nodes.append(value)
            self.kinds.append(kind)
            self.edges.append([])
            self.index.setdefault(id(value), node)
            if parent >= 0:
                self.edges[parent].append(node)
            if isinstance(value, list):
                inner = _SCHEMA if kind == _SCHEMA_LIST else _DATA
                stack.extend((item, depth + 1, inner, node) for item in value)
            elif kind == _SCHEMA_MAP:
                stack.extend((item, depth + 1, _SCHEMA, node) for item in value.values())
            elif kind == _SCHEMA:
                self._schema(value, node, depth, stack)
            else:
                stack.extend((item, depth + 1, _DATA, node) for item in value.values())

    def _schema(
        self,
        schema: dict[str, Any],
        node: int,
        depth: int,
        stack: list[tuple[Any, int, int, int]],
    ) -> None:
        if "x-guidance" in schema and not isinstance(schema["x-guidance"], dict):
            raise SchemaError("x-guidance must be an object (of llguidance's JSON options)")
        if "$ref" in schema:
            ref = schema["$ref"]
            if not isinstance(ref, str):
                raise SchemaError("$ref must be a string")
            self.counts.refs += 1
            self.refs.append((node, ref))
        if node > 0 and any(key in schema for key in _RESOURCE_KEYS):
            self.pointer_refs_only = False  # $refs may be relative to this subschema
        counts = self.counts
        for key in ("properties", "$defs", "definitions"):
            if isinstance(schema.get(key), dict):
                if key == "properties":
                    counts.properties += len(schema[key])
                else:
                    counts.definitions += len(schema[key])
        patterns = schema.get("patternProperties")
        if isinstance(patterns, dict):
            if len(patterns) > MAX_PATTERN_PROPERTIES:
                raise SchemaError(
                    f"an object has more than {MAX_PATTERN_PROPERTIES} patternProperties "
                    "(the limit)"
                )
            counts.pattern_properties += len(patterns)
        for key, item in schema.items():
            if key in _ONE or key == "items":
                kind = _SCHEMA_LIST if isinstance(item, list) else _SCHEMA
            elif key in _LIST:
                kind = _SCHEMA_LIST
            elif key in _MAP or key == "dependencies":
                kind = _SCHEMA_MAP
            else:
                kind = _DATA
            stack.append((item, depth + 1, kind, node))

    def resolve_refs(self, root: Any) -> None:
        for node, ref in self.refs:
            target = _pointer(root, ref) if self.pointer_refs_only else _MISSING
            if target is _MISSING:  # an anchor, an $id-relative or remote $ref...
                self.pointer_refs_only = False
                continue
            self.targets[node] = target
            if isinstance(target, dict | list):
                self.edges[node].append(self.index[id(target)])

    def depth(self) -> int:
        """The most levels the compiler could recurse through: the longest path from the root,
        each cycle's levels all counted. Without resolved refs, every container counts."""
        if not self.pointer_refs_only:
            self.has_cycle = True  # as far as anyone here can tell
            return len(self.nodes)
        components, component_of = _strongly_connected(self.edges)
        self.has_cycle = len(components) < len(self.nodes) or any(
            node in self.edges[node] for node, _ in self.refs
        )
        longest = [0] * len(components)
        for c, members in enumerate(components):  # successors come first
            best = 0
            for node in members:
                for succ in self.edges[node]:
                    other = component_of[succ]
                    if other != c and longest[other] > best:
                        best = longest[other]
            longest[c] = len(members) + best
        return longest[component_of[0]] if self.nodes else 0

    def admits_a_finite_value(self) -> bool:
        """Whether the root schema has a finite instance, as far as required properties,
        minItems, allOf, anyOf/oneOf and $refs tell (an over-approximation: anything it
        cannot judge counts as finite). The least fixed point of AND/OR gates."""
        if not self.nodes or not isinstance(self.nodes[0], dict):
            return True
        gates = _Gates()
        referenced = {
            self.index[id(t)] for t in self.targets.values() if isinstance(t, dict | list)
        }
        schema_gate = {
            node: gates.new(_AND)
            for node, value in enumerate(self.nodes)
            if isinstance(value, dict) and (self.kinds[node] == _SCHEMA or node in referenced)
        }

        def gate(value: Any) -> int:
            if isinstance(value, dict):
                node = self.index.get(id(value))
                if node is not None and node in schema_gate:
                    return schema_gate[node]
                return gates.true
            return gates.false if value is False else gates.true

        for node, g in schema_gate.items():
            schema = self.nodes[node]
            parts: list[int] = []
            if node in self.targets:
                parts.append(gate(self.targets[node]))
            if isinstance(schema.get("allOf"), list):
                parts.extend(gate(s) for s in schema["allOf"])
            for key in ("anyOf", "oneOf"):
                if isinstance(schema.get(key), list) and schema[key]:
                    parts.append(gates.new(_OR, [gate(s) for s in schema[key]]))
            if "const" not in schema and "enum" not in schema:
                parts.append(gates.new(_OR, self._type_branches(schema, gate, gates)))
            gates.attach(g, parts)
        return gates.solve(schema_gate[0])

    @staticmethod
    def _type_branches(schema: dict[str, Any], gate: Any, gates: _Gates) -> list[int]:
        kinds = schema.get("type", _TYPES)
        kinds = [kinds] if isinstance(kinds, str) else kinds
        if not isinstance(kinds, list) or any(k not in ("object", "array") for k in kinds):
            return [gates.true]  # a scalar type ends at once (or llguidance will complain)
        branches = []
        for kind in kinds:
            needed = []
            if kind == "object" and isinstance(schema.get("required"), list):
                props = schema.get("properties")
                props = props if isinstance(props, dict) else {}
                for name in schema["required"]:
                    if not isinstance(name, str):
                        continue  # llguidance's to refuse
                    if name in props:
                        needed.append(gate(props[name]))
                    elif not schema.get("patternProperties") and "additionalProperties" in schema:
                        needed.append(gate(schema["additionalProperties"]))
            elif kind == "array":
                least = schema.get("minItems", 0)
                least = least if isinstance(least, int) else 0
                if "prefixItems" in schema:
                    prefix, rest = schema["prefixItems"], schema.get("items")
                elif isinstance(schema.get("items"), list):  # draft 4-7's tuple form
                    prefix, rest = schema["items"], schema.get("additionalItems")
                else:
                    prefix, rest = [], schema.get("items")
                prefix = prefix if isinstance(prefix, list) else []
                needed.extend(gate(s) for s in prefix[: max(least, 0)])
                if least > len(prefix) and rest is not None:
                    needed.append(gate(rest))
                if "contains" in schema and schema.get("minContains", 1) != 0:
                    needed.append(gate(schema["contains"]))
            branches.append(gates.new(_AND, needed))
        return branches


_MISSING = object()
_AND, _OR = 0, 1


class _Gates:
    """AND/OR gates over each other; :meth:`solve` finds which are true (least fixed point),
    in time linear in the number of edges."""

    def __init__(self) -> None:
        self.kind: list[int] = []
        self.children: list[list[int]] = []
        self.true = self.new(_AND)  # no inputs: true
        self.false = self.new(_OR)  # no inputs: never true

    def new(self, kind: int, children: list[int] | None = None) -> int:
        self.kind.append(kind)
        self.children.append(list(children or ()))
        return len(self.kind) - 1

    def attach(self, gate: int, children: list[int]) -> None:
        self.children[gate].extend(children)

    def solve(self, goal: int) -> bool:
        parents: list[list[int]] = [[] for _ in self.kind]
        need = [0] * len(self.kind)
        for g, children in enumerate(self.children):
            need[g] = len(children) if self.kind[g] == _AND else min(len(children), 1)
            for child in children:
                parents[child].append(g)
        true = [False] * len(self.kind)
        ready = [g for g, kind in enumerate(self.kind) if kind == _AND and need[g] == 0]
        while ready:
            g = ready.pop()
            if true[g]:
                continue
            true[g] = True
            for parent in parents[g]:
                if true[parent]:
                    continue
                need[parent] -= 1
                if need[parent] <= 0 or self.kind[parent] == _OR:
                    ready.append(parent)
        return true[goal]


def _pointer(root: Any, ref: str) -> Any:
    """What a ``#/a/b`` JSON-pointer $ref points to in ``root`` (_MISSING if it does not)."""
    if not ref.startswith("#"):
        return _MISSING
    pointer = unquote(ref[1:])
    if pointer == "":
        return root
    if not pointer.startswith("/"):
        return _MISSING  # "#name": an anchor
    value = root
    for part in pointer[1:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return _MISSING
    return value


def _strongly_connected(edges: list[list[int]]) -> tuple[list[list[int]], list[int]]:
    """Tarjan's strongly connected components, iteratively. Components come out in reverse
    topological order: every component reachable from one comes before it."""
    count = len(edges)
    index = [-1] * count
    low = [0] * count
    on_stack = [False] * count
    component_of = [-1] * count
    stack: list[int] = []
    components: list[list[int]] = []
    counter = 0
    for start in range(count):
        if index[start] >= 0:
            continue
        work = [(start, 0)]
        while work:
            node, i = work[-1]
            if i == 0 and index[node] < 0:
                index[node] = low[node] = counter
                counter += 1
                stack.append(node)
                on_stack[node] = True
            if i < len(edges[node]):
                work[-1] = (node, i + 1)
                succ = edges[node][i]
                if index[succ] < 0:
                    work.append((succ, 0))
                elif on_stack[succ]:
                    low[node] = min(low[node], index[succ])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                members = []
                while True:
                    member = stack.pop()
                    on_stack[member] = False
                    component_of[member] = len(components)
                    members.append(member)
                    if member == node:
                        break
                components.append(members)
    return components, component_of


# Compiling (see constraint.CompilePool): a few threads, each with a stack far
# larger than MAX_SCHEMA_DEPTH needs (virtual memory: only what a compile touches is used).
COMPILE_THREADS = 2
COMPILE_STACK_BYTES = 256 * 2**20
COMPILE_TIMEOUT_S = 10.0  # one compile; the largest schemas within the limits take < 1 s
COMPILE_QUEUE_WAIT_S = 30.0  # waiting for a free compile thread, then a 429
MAX_STUCK_COMPILES = 2  # compiles past their time limit whose threads are replaced
