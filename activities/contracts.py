"""Versioned tool contracts: what ``tools.lock.json`` pins, and when a change needs a new version.

The lock records, per tool name and version, the input and output JSON Schemas and the semantic
flags (``side_effects``, ``compensation``, ``compensates``, ``risk``). `spine tools check`
compares what a worker would serve against it; `spine tools lock` rewrites it.

A change to a pinned version is **breaking** (it needs ``@tool(version=N+1)``) when:

* a field is removed (input or output);
* input: a field becomes required, or accepts less than before: a type is dropped (``number`` ->
  ``integer`` too), an ``enum``/``const`` appears or loses values, ``pattern`` or ``format`` is
  added or changed, ``maxLength``/``maxItems``/``maximum``/``exclusiveMaximum`` appears or
  decreases, ``minLength``/``minItems``/``minimum``/``exclusiveMinimum`` appears or increases,
  ``multipleOf`` appears or changes, ``uniqueItems`` or ``additionalProperties: false`` appears;
* output: the same rules the other way round: a field that was always returned becomes optional,
  or a value may now be something the old schema did not allow (a new type or enum value, a
  looser bound), since callers rely on what the output promised;
* a semantic flag changes.

Everything else is **compatible**: new optional input fields, new output fields, looser input
rules, tighter output rules, and edits of titles, descriptions, defaults and examples (not
compared). A union (``anyOf``/``oneOf``) other than "X or null" compares its members as exact
JSON: members may be added to an input union (or removed from an output one), nothing else.

A new version is a new entry; the lock keeps every version the worker still serves, so runs
pinned to an old version keep working until that version is dropped from the code.

Pure functions over plain data: no I/O except :func:`load_lock` and :func:`write_lock`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

from spine.activities.tools import ToolDefinition

LOCK_FORMAT = 1
DEFAULT_LOCK_PATH = Path("tools.lock.json")
SEMANTIC_FLAGS = ("side_effects", "compensation", "compensates", "risk")

ChangeKind = Literal["breaking", "compatible", "new", "unserved"]
T = TypeVar("T")
Direction = Literal["input", "output"]

# Keywords that describe but do not constrain; edits to them are not compared.
_ANNOTATIONS = {"title", "description", "default", "examples", "deprecated", "readOnly"}
_UPPER_BOUNDS = ("maxLength", "maxItems", "maxProperties", "maximum", "exclusiveMaximum")
_LOWER_BOUNDS = ("minLength", "minItems", "minProperties", "minimum", "exclusiveMinimum")


class LockError(ValueError):
    """The lock file cannot be read or has the wrong shape; the message names the file."""


@dataclass(frozen=True)
class Change:
    """One difference between the lock and the served tools."""

    tool: str
    version: int
    kind: ChangeKind
    where: str
    message: str

    @property
    def breaking(self) -> bool:
        return self.kind == "breaking"

    def line(self) -> str:
        """One line naming the tool, version and field, e.g. for the CLI."""
        where = f"{self.where}: " if self.where else ""
        fix = (
            f"; bump the version (@tool(version={self.version + 1})) or revert"
            if self.breaking
            else ""
        )
        return f"tool {self.tool!r} v{self.version}: {where}{self.message}{fix}"

    def as_json(self) -> dict[str, object]:
        return {
            "tool": self.tool,
            "version": self.version,
            "kind": self.kind,
            "where": self.where,
            "message": self.message,
        }


# --------------------------------------------------------------------------- the lock file


def tool_entry(definition: ToolDefinition) -> dict[str, object]:
    """What the lock pins for one tool version."""
    return {
        "input_schema": definition.input_schema(),
        "output_schema": definition.output_schema(),
        "side_effects": definition.side_effects,
        "compensation": definition.compensation,
        "compensates": definition.compensates,
        "risk": definition.risk,
    }


def build_lock(tools: Iterable[ToolDefinition]) -> dict[str, object]:
    """The lock document for `tools` (every served version)."""
    entries: dict[str, dict[str, object]] = {}
    for definition in tools:
        entries.setdefault(definition.name, {})[str(definition.version)] = tool_entry(definition)
    return {"format": LOCK_FORMAT, "tools": entries}


def dumps_lock(lock: Mapping[str, object]) -> str:
    """Deterministic text: sorted keys, two-space indent, trailing newline."""
    return json.dumps(lock, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def load_lock(path: Path) -> dict[str, dict[int, dict[str, object]]]:
    """Read a lock file as ``{tool: {version: entry}}``; a missing file is an empty lock.

    Raises:
        LockError: the file is not JSON or not a lock document.
    """
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as err:
        raise LockError(f"cannot read lock file {str(path)!r}: {err.strerror}") from err
    try:
        data = json.loads(text)
    except ValueError as err:
        raise LockError(f"{path}: not valid JSON: {err}") from err
    if not isinstance(data, dict) or data.get("format") != LOCK_FORMAT:
        raise LockError(f'{path}: not a tools lock (expected "format": {LOCK_FORMAT})')
    tools = data.get("tools")
    if not isinstance(tools, dict):
        raise LockError(f'{path}: "tools" must be an object of tool names')
    parsed: dict[str, dict[int, dict[str, object]]] = {}
    for name, versions in tools.items():
        if not isinstance(versions, dict):
            raise LockError(f"{path}: tools.{name} must be an object of versions")
        for version, entry in versions.items():
            if not (version.isdigit() and isinstance(entry, dict)):
                raise LockError(f"{path}: tools.{name}.{version} is not a version entry")
            parsed.setdefault(name, {})[int(version)] = entry
    return parsed


def write_lock(path: Path, tools: Iterable[ToolDefinition]) -> str:
    """Rewrite the lock file for `tools`; returns the text written."""
    text = dumps_lock(build_lock(tools))
    path.write_text(text)
    return text


# ---------------------------------------------------------------------------- comparison


def check_lock(
    locked: Mapping[str, Mapping[int, Mapping[str, object]]], tools: Iterable[ToolDefinition]
) -> list[Change]:
    """Every difference between the lock and the served tools, breaking ones first."""
    changes: list[Change] = []
    served: set[tuple[str, int]] = set()
    for definition in sorted(tools, key=lambda d: (d.name, d.version)):
        key = (definition.name, definition.version)
        served.add(key)
        old = locked.get(definition.name, {}).get(definition.version)
        if old is None:
            changes.append(Change(*key, "new", "", "not in the lock yet; run `spine tools lock`"))
            continue
        changes.extend(compare_entries(*key, old, tool_entry(definition)))
    for name, versions in sorted(locked.items()):
        for version in sorted(versions):
            if (name, version) not in served:
                changes.append(
                    Change(
                        name,
                        version,
                        "unserved",
                        "",
                        "in the lock but no longer served (runs pinned to it will fail); "
                        "`spine tools lock` drops it",
                    )
                )
    order = {"breaking": 0, "compatible": 1, "new": 2, "unserved": 3}
    return sorted(changes, key=lambda c: order[c.kind])


def compare_entries(
    tool: str, version: int, old: Mapping[str, object], new: Mapping[str, object]
) -> list[Change]:
    """Differences between two lock entries of the same tool version."""
    changes = []
    for flag in SEMANTIC_FLAGS:
        if old.get(flag) != new.get(flag):
            changes.append(
                Change(
                    tool,
                    version,
                    "breaking",
                    flag,
                    f"changed from {json.dumps(old.get(flag))} to {json.dumps(new.get(flag))}",
                )
            )
    for direction in ("input", "output"):
        key = f"{direction}_schema"
        old_schema, new_schema = old.get(key) or {}, new.get(key) or {}
        if _canonical(old_schema) == _canonical(new_schema):
            continue
        found = compare_schemas(_mapping(old_schema), _mapping(new_schema), direction)
        changes.extend(Change(tool, version, kind, where, msg) for kind, where, msg in found)
    return changes


def compare_schemas(
    old: Mapping[str, object], new: Mapping[str, object], direction: Direction
) -> list[tuple[ChangeKind, str, str]]:
    """(kind, where, message) for each difference that matters between two schema versions.

    Input schemas must accept at least what they accepted; output schemas must promise at most
    what they promised. Annotation-only edits yield one ``compatible`` entry.
    """
    walker = _Walker(old, new, direction)
    walker.compare(old, new, "")
    if not walker.found:
        walker.found.append(("compatible", direction, "schema changed compatibly"))
    return walker.found


class _Walker:
    """Walks an old and a new schema in step.

    Input: whatever the old schema accepted, the new one must accept. Output: whatever the new
    schema may return, the old one must have promised. So in both directions one side ("inner")
    must be a subset of the other ("outer"), and each place where it is not is breaking.
    """

    def __init__(
        self, old_root: Mapping[str, object], new_root: Mapping[str, object], d: Direction
    ) -> None:
        self.old_root = old_root
        self.new_root = new_root
        self.direction = d
        self.found: list[tuple[ChangeKind, str, str]] = []
        self._seen: set[tuple[str, str, str]] = set()

    def _where(self, path: str) -> str:
        return f"{self.direction} field {path!r}" if path else self.direction

    def breaking(self, path: str, message: str) -> None:
        self.found.append(("breaking", self._where(path), message))

    def compatible(self, path: str, message: str) -> None:
        self.found.append(("compatible", self._where(path), message))

    def compare(self, old: object, new: object, path: str) -> None:
        refs = (_ref(old), _ref(new), path)
        if refs[0] and refs[1]:
            if refs in self._seen:  # a recursive schema: comparing it once is enough
                return
            self._seen.add(refs)
        old_s = _resolve(old, self.old_root)
        new_s = _resolve(new, self.new_root)
        old_n = _normalise(old_s, self.old_root)
        new_n = _normalise(new_s, self.new_root)
        if old_n is None or new_n is None:
            self._union(old_s, new_s, path)
            return
        (old_types, old_s), (new_types, new_s) = old_n, new_n
        self._types(old_types, new_types, path)
        self._values(old_s, new_s, path)
        self._bounds(old_s, new_s, path)
        if _allows(old_types, "array") and _allows(new_types, "array"):
            if "items" in old_s or "items" in new_s:
                self.compare(old_s.get("items", {}), new_s.get("items", {}), f"{path}[]")
        if _allows(old_types, "object") and _allows(new_types, "object"):
            self._object(old_s, new_s, path)

    def _inner_outer(self, old: T, new: T) -> tuple[T, T]:
        return (old, new) if self.direction == "input" else (new, old)

    def _types(self, old: frozenset[str] | None, new: frozenset[str] | None, path: str) -> None:
        inner, outer = self._inner_outer(old, new)
        if outer is None:
            return
        lost = ["(any)"] if inner is None else sorted(t for t in inner if not _type_ok(t, outer))
        if lost:
            verb = "no longer accepts" if self.direction == "input" else "may now return"
            self.breaking(path, f"type {_types(old)} -> {_types(new)} ({verb} {', '.join(lost)})")

    def _values(self, old: Mapping[str, object], new: Mapping[str, object], path: str) -> None:
        inner, outer = self._inner_outer(_enum(old), _enum(new))
        if outer is None:
            return
        if inner is None:
            self.breaking(path, f"now limited to {_values(outer)}")
            return
        allowed = {_canonical(v) for v in outer}
        extra = [v for v in inner if _canonical(v) not in allowed]
        if extra:
            verb = "no longer accepts" if self.direction == "input" else "may now return"
            self.breaking(path, f"{verb} {_values(extra)}")

    def _bounds(self, old: Mapping[str, object], new: Mapping[str, object], path: str) -> None:
        inner, outer = self._inner_outer(old, new)

        def changed(key: str) -> None:
            self.breaking(path, f"{key} {_show(old.get(key))} -> {_show(new.get(key))}")

        for key in ("pattern", "format", "multipleOf"):
            if key in outer and inner.get(key) != outer.get(key):
                changed(key)
        for key in _UPPER_BOUNDS + _LOWER_BOUNDS:
            limit = outer.get(key)
            if not isinstance(limit, int | float):
                continue
            value = inner.get(key)
            if not isinstance(value, int | float):
                changed(key)
            elif value > limit if key in _UPPER_BOUNDS else value < limit:
                changed(key)
        if outer.get("uniqueItems") is True and inner.get("uniqueItems") is not True:
            changed("uniqueItems")
        closed = outer.get("additionalProperties") is False
        if closed and inner.get("additionalProperties") is not False:
            changed("additionalProperties")

    def _object(self, old: Mapping[str, object], new: Mapping[str, object], path: str) -> None:
        old_props, new_props = _props(old), _props(new)
        prefix = f"{path}." if path else ""
        for name in sorted(old_props):
            if name not in new_props:
                self.breaking(f"{prefix}{name}", "removed")
            else:
                self.compare(old_props[name], new_props[name], f"{prefix}{name}")
        old_req, new_req = set(_required(old)), set(_required(new))
        if self.direction == "input":
            for name in sorted(new_req - old_req):
                self.breaking(f"{prefix}{name}", "newly required")
        else:
            for name in sorted((old_req - new_req) & set(new_props)):
                self.breaking(f"{prefix}{name}", "no longer always returned")
        for name in sorted(set(new_props) - set(old_props)):
            if self.direction == "output" or name not in new_req:
                self.compatible(f"{prefix}{name}", "added")

    def _union(self, old: Mapping[str, object], new: Mapping[str, object], path: str) -> None:
        old_members = {_canonical(_deep_resolve(m, self.old_root)) for m in _members(old)}
        new_members = {_canonical(_deep_resolve(m, self.new_root)) for m in _members(new)}
        inner, outer = self._inner_outer(old_members, new_members)
        if not inner <= outer:
            self.breaking(path, "union (anyOf/oneOf) changed in a way that is not additive")


# ------------------------------------------------------------------------------ helpers


def _mapping(value: object) -> Mapping[str, object]:
    return value if isinstance(value, Mapping) else {}


def _canonical(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _ref(schema: object) -> str:
    return str(schema.get("$ref", "")) if isinstance(schema, Mapping) else ""


def _resolve(schema: object, root: Mapping[str, object]) -> dict[str, object]:
    """Follow local ``$ref``s (``#/$defs/...``); sibling keywords win over the target's."""
    if schema is True or schema is None:
        return {}
    if schema is False:
        return {"not": {}}
    current = dict(schema) if isinstance(schema, Mapping) else {}
    for _ in range(32):
        ref = current.get("$ref")
        if not (isinstance(ref, str) and ref.startswith("#/")):
            break
        target: object = root
        for part in ref[2:].split("/"):
            part = part.replace("~1", "/").replace("~0", "~")
            target = target.get(part) if isinstance(target, Mapping) else None
        siblings = {k: v for k, v in current.items() if k != "$ref"}
        current = {**(dict(target) if isinstance(target, Mapping) else {}), **siblings}
    return current


def _deep_resolve(schema: object, root: Mapping[str, object], depth: int = 0) -> object:
    """A schema with its local refs inlined (to a bounded depth), for exact comparison."""
    if depth > 8:
        return schema
    if isinstance(schema, Mapping):
        resolved = _resolve(schema, root) if "$ref" in schema else dict(schema)
        return {
            k: _deep_resolve(v, root, depth + 1)
            for k, v in resolved.items()
            if k not in _ANNOTATIONS and k != "$defs"
        }
    if isinstance(schema, list):
        return [_deep_resolve(v, root, depth + 1) for v in schema]
    return schema


def _members(schema: Mapping[str, object]) -> list[object]:
    members = schema.get("anyOf", schema.get("oneOf"))
    return list(members) if isinstance(members, list) else [schema]


def _normalise(
    schema: Mapping[str, object], root: Mapping[str, object]
) -> tuple[frozenset[str] | None, dict[str, object]] | None:
    """(allowed types or None for any, the schema to compare), or None for a real union.

    "X or null" (pydantic's ``Optional``) and unions of bare types collapse into one schema.
    """
    types = _type_set(schema.get("type"))
    members = schema.get("anyOf", schema.get("oneOf"))
    if not isinstance(members, list):
        return types, dict(schema)
    resolved = [_resolve(m, root) for m in members]
    nullable = any(m.get("type") == "null" for m in resolved)
    rest = [m for m in resolved if m.get("type") != "null"]
    outside = {k: v for k, v in schema.items() if k not in ("anyOf", "oneOf")}
    if len(rest) == 1:
        merged = {**rest[0], **{k: v for k, v in outside.items() if k not in _ANNOTATIONS}}
        member_types = _type_set(merged.get("type"))
        if member_types is not None and nullable:
            member_types = member_types | {"null"}
        return member_types, merged
    if all(set(m) - _ANNOTATIONS <= {"type"} and "type" in m for m in rest):
        union: set[str] = {"null"} if nullable else set()
        for m in rest:
            union |= _type_set(m["type"]) or set()
        return frozenset(union), outside
    return None


def _type_set(value: object) -> frozenset[str] | None:
    if isinstance(value, str):
        return frozenset({value})
    if isinstance(value, list):
        return frozenset(str(v) for v in value)
    return None


def _type_ok(kind: str, allowed: frozenset[str]) -> bool:
    return kind in allowed or (kind == "integer" and "number" in allowed)


def _allows(types: frozenset[str] | None, kind: str) -> bool:
    return types is None or kind in types


def _types(types: frozenset[str] | None) -> str:
    return "(any)" if types is None else "|".join(sorted(types))


def _enum(schema: Mapping[str, object]) -> list[object] | None:
    if "const" in schema:
        return [schema["const"]]
    enum = schema.get("enum")
    return list(enum) if isinstance(enum, list) else None


def _values(values: list[object]) -> str:
    return "values " + ", ".join(json.dumps(v) for v in values)


def _show(value: object) -> str:
    return "(none)" if value is None else json.dumps(value)


def _props(schema: Mapping[str, object]) -> dict[str, object]:
    props = schema.get("properties")
    return dict(props) if isinstance(props, Mapping) else {}


def _required(schema: Mapping[str, object]) -> list[str]:
    required = schema.get("required")
    return [str(r) for r in required] if isinstance(required, list) else []
