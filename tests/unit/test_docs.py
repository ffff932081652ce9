"""The docs stay true: the configuration page against the config schema, every link and file path
the pages name, the plugin guide's hooks and exports, the metrics table, the layering rule."""

from __future__ import annotations

import ast
import inspect
import re
import sys
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, get_args, get_origin

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

import pytest
from pydantic import BaseModel, BeforeValidator
from pydantic.fields import FieldInfo

from mlxserve.core.config.schema import Config, KVBudget

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
CONFIG_PAGE = DOCS / "configuration.md"
ROOMS = ("core", "plugins", "registry", "server")
# A nested table documented as "any key of another table", not by a table of its own.
SAME_KEYS_AS = {"models.NAME.kv_cache": "kv_cache"}


def text_of(page: Path) -> str:
    return page.read_text(encoding="utf-8")


def without_code(text: str) -> str:
    """The Markdown outside fenced code blocks (headings and links in code are not ones)."""
    return re.sub(r"^```.*?^```[ \t]*$", "", text, flags=re.M | re.S)


# ---- the configuration page against the schema ------------------------------------------


def _unwrapped(annotation: Any) -> tuple[Any, list[Any]]:
    """The type under ``X | None`` and ``Annotated[X, ...]``, and the Annotated metadata."""
    metadata: list[Any] = []
    while True:
        origin = get_origin(annotation)
        if origin is typing.Annotated:
            annotation, *extra = get_args(annotation)
            metadata += extra
        elif origin in (typing.Union, types.UnionType):
            options = [arg for arg in get_args(annotation) if arg is not type(None)]
            if len(options) != 1:
                return annotation, metadata
            annotation = options[0]
        else:
            return annotation, metadata


def _table_of(field: FieldInfo) -> tuple[type[BaseModel] | None, bool]:
    """(the model of a nested TOML table, whether it is keyed by a name: ``dict[str, Model]``).

    A model parsed from a plain value (``budget = "2GB"``, a BeforeValidator) is a value."""
    annotation, metadata = _unwrapped(field.annotation)
    metadata += field.metadata
    keyed = get_origin(annotation) is dict
    if keyed:
        annotation, _ = _unwrapped(get_args(annotation)[1])
    is_model = inspect.isclass(annotation) and issubclass(annotation, BaseModel)
    if not is_model or any(isinstance(m, BeforeValidator) for m in metadata):
        return None, False
    return annotation, keyed


def schema_tables(
    model: type[BaseModel] = Config, prefix: str = ""
) -> Iterator[tuple[str, dict[str, FieldInfo]]]:
    """Every TOML table of the schema, dotted (``server``, ``models.NAME``,
    ``models.NAME.kv_cache``), with its keys; a nested table is also a key of its parent."""
    for name, field in model.model_fields.items():
        table, keyed = _table_of(field)
        if table is None:
            continue
        dotted = f"{prefix}{name}" + (".NAME" if keyed else "")
        yield dotted, table.model_fields
        yield from schema_tables(table, dotted + ".")


def documented_tables() -> dict[str, dict[str, str]]:
    """Each ``## `[table]` `` section of the configuration page: its key table's keys, each with
    its Default cell."""
    tables: dict[str, dict[str, str]] = {}
    section = None
    for line in without_code(text_of(CONFIG_PAGE)).splitlines():
        heading = re.fullmatch(r"##+ `\[([^\]]+)\]`", line.strip())
        if line.startswith("#"):
            section = heading[1] if heading else None
            if section is not None:
                assert section not in tables, f"[{section}] is documented twice"
                tables[section] = {}
            continue
        cells = [cell.strip() for cell in line.strip().split("|")[1:-1]]
        if section is None or len(cells) < 3 or cells[0] == "Key" or set(cells[0]) <= {"-", ":"}:
            continue
        key = re.fullmatch(r"`([A-Za-z0-9_]+)`", cells[0])
        assert key, f"[{section}]: the first column should be a key in backticks: {cells[0]!r}"
        assert key[1] not in tables[section], f"[{section}] {key[1]} is documented twice"
        tables[section][key[1]] = cells[2]
    return tables


def test_every_config_key_is_documented_and_every_documented_key_exists() -> None:
    schema = dict(schema_tables())
    documented = documented_tables()
    page = text_of(CONFIG_PAGE)
    for table, keys in schema.items():
        if table in SAME_KEYS_AS:
            other = SAME_KEYS_AS[table]
            assert set(keys) == set(schema[other]), f"[{table}] no longer has [{other}]'s keys"
            assert f"`[{table}]`" in page and f"any `[{other}]` key" in page, table
            continue
        assert table in documented, f"[{table}] has no section with a key table in {CONFIG_PAGE}"
        missing = sorted(set(keys) - set(documented[table]))
        assert not missing, f"[{table}] keys missing from {CONFIG_PAGE.name}: {missing}"
    for table, keys in documented.items():
        assert table in schema, f"{CONFIG_PAGE.name} documents [{table}], which does not exist"
        unknown = sorted(set(keys) - set(schema[table]))
        assert not unknown, f"{CONFIG_PAGE.name} documents keys [{table}] does not have: {unknown}"


def _setting(value: Any) -> Any:
    """A schema default as it is written in TOML."""
    if isinstance(value, KVBudget):
        return value.to_setting()
    if isinstance(value, Path):
        return str(value)
    return value


def test_documented_defaults_are_the_schemas() -> None:
    schema = dict(schema_tables())
    for table, keys in documented_tables().items():
        for key, cell in keys.items():
            field = schema[table][key]
            where = f"{CONFIG_PAGE.name} [{table}] {key}: default {cell!r}"
            if field.is_required():
                assert cell in ("–", "-", "required"), where
                continue
            default = _setting(field.get_default(call_default_factory=True))
            if cell.startswith("unset"):
                assert default is None, f"{where}, but the schema's is {default!r}"
                continue
            shown = re.match(r"`([^`]+)`", cell)
            assert shown, f"{where}: neither `value` nor unset"
            value = tomllib.loads(f"v = {shown[1]}")["v"]
            assert value == default, f"{where}, but the schema's is {default!r}"


# ---- links and paths ------------------------------------------------------------------------


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found: set[str] = set()
    for line in without_code(text_of(page)).splitlines():
        heading = re.match(r"#{1,6} (.+)", line)
        if heading:
            base = slug(heading[1])
            name, n = base, 0
            while name in found:
                n += 1
                name = f"{base}-{n}"
            found.add(name)
    return found


def links(page: Path) -> Iterator[str]:
    text = re.sub(r"`[^`\n]*`", "", without_code(text_of(page)))
    yield from re.findall(r"\]\(([^)\s]+)\)", text)


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_relative_link_points_to_a_file_and_heading_that_exist(page: Path) -> None:
    for target in links(page):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        assert file.exists(), f"{page.name}: link to {target}: no such file"
        if anchor and file.suffix == ".md":
            assert anchor in anchors(file), f"{page.name}: link to {target}: no such heading"


PATH = re.compile(r"(?<![\w/.~-])((?:core|plugins|registry|server|tests|\.ci)/[\w./-]*)")


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_file_path_the_docs_name_exists(page: Path) -> None:
    for match in PATH.finditer(text_of(page)):
        path = match[1].rstrip(".")
        if "<" in text_of(page)[match.end() : match.end() + 1]:  # a pattern: plugins/<x>.py
            continue
        assert (ROOT / path).exists(), f"{page.name} names {path}, which does not exist"


def test_the_readme_keeps_the_commands_ci_runs() -> None:
    readme = text_of(ROOT / "README.md")
    for marker, needle in [("demo-command", "mlxserve serve"), ("test-command", "pytest")]:
        block = re.search(rf"<!-- {marker} -->\n```sh\n(.+?)\n```", readme, re.S)
        assert block and needle in block[1], f"README.md: no sh block after <!-- {marker} -->"


# ---- the plugin guide -----------------------------------------------------------------------


def test_every_hook_has_a_heading_in_the_plugin_guide() -> None:
    from mlxserve.plugins import hookspecs

    guide = text_of(DOCS / "plugins.md")
    hooks = [name for name in vars(hookspecs) if name.startswith("mlxserve_")]
    assert hooks
    for name in hooks:
        spec = getattr(hookspecs, name)
        heading = f"{name}({', '.join(inspect.signature(spec).parameters)})"
        assert re.search(rf"^#+ `?{re.escape(heading)}`?$", guide, re.M), f"undocumented: {heading}"


def test_everything_the_plugin_contract_exports_is_in_the_plugin_guide() -> None:
    import mlxserve.plugins

    guide = text_of(DOCS / "plugins.md")
    missing = [name for name in mlxserve.plugins.__all__ if f"`{name}`" not in guide]
    assert not missing, f"docs/plugins.md does not mention: {missing}"


# ---- the metrics table ------------------------------------------------------------------------


def test_every_metric_is_in_the_metrics_table_and_every_row_is_a_metric() -> None:
    from mlxserve.core.metrics import EngineMetrics
    from mlxserve.server.http.connections import ConnectionGuard

    engine = SimpleNamespace(observers=[], workers={}, queue_depth=lambda: 0)
    families = [
        *EngineMetrics(engine).registry.collect(),
        *ConnectionGuard(8, 10.0, 60.0).collect(),
    ]
    served = {f.name + ("_total" if f.type == "counter" else "") for f in families}
    api = without_code(text_of(DOCS / "api.md"))
    documented = set(re.findall(r"^\| `(mlxserve_\w+)` \|", api, re.M))
    assert not served - documented, f"metrics missing from docs/api.md: {served - documented}"
    unknown = documented - served
    assert not unknown, f"docs/api.md lists metrics that do not exist: {unknown}"


# ---- the layering rule (docs/development.md) --------------------------------------------------

MAY_IMPORT = {
    "core": {"core"},
    "plugins": {"core", "plugins"},
    "registry": {"core", "plugins", "registry"},
    "server": {"core", "plugins", "registry", "server"},
}


def imported_rooms(file: Path) -> Iterator[tuple[int, str]]:
    package = ["mlxserve", *file.relative_to(ROOT).parent.parts]
    for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            names = [".".join([*base, *(node.module or "").split(".")]).strip(".")]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "mlxserve" and len(parts) > 1:
                yield node.lineno, parts[1]


def architecture_map() -> dict[str, set[str]]:
    """The rows of docs/development.md's architecture map: a folder of a room, and the module
    files its row names."""
    page = without_code(text_of(DOCS / "development.md"))
    section = page.split("## The architecture map", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, set[str]] = {}
    for folder, text in re.findall(r"^\| `([\w/]+)/` \| (.+) \|$", section, re.M):
        if folder.split("/")[0] in ROOMS:
            rows.setdefault(folder, set()).update(re.findall(r"`([\w]+\.py)`", text))
    return rows


def test_the_architecture_map_names_every_module_of_the_rooms() -> None:
    # Folders of data (server/static/) have a row but no modules.
    rows = {f: m for f, m in architecture_map().items() if any((ROOT / f).glob("*.py")) or m}
    folders = {
        str(init.parent.relative_to(ROOT))
        for room in ROOMS
        for init in (ROOT / room).rglob("__init__.py")
    }
    assert folders == set(rows), f"folders not in the map, or gone: {folders ^ set(rows)}"
    for folder, named in rows.items():
        modules = {f.name for f in (ROOT / folder).glob("*.py") if f.name != "__init__.py"}
        assert not named - modules, f"docs/development.md: {folder}/ has no {named - modules}"
        assert not modules - named, f"docs/development.md: {folder}/'s row misses {modules - named}"


def test_each_room_imports_only_the_rooms_below_it() -> None:
    assert "imports no other room" in text_of(DOCS / "development.md")
    wrong = [
        f"{file.relative_to(ROOT)}:{line} imports mlxserve.{room}"
        for own in ROOMS
        for file in sorted((ROOT / own).rglob("*.py"))
        for line, room in imported_rooms(file)
        if room in ROOMS and room not in MAY_IMPORT[own]
    ]
    assert not wrong, "\n".join(wrong)
