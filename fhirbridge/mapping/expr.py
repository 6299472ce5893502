"""The mapping language compiler: templates and expressions → closures, compiled once at load.

Pure: no I/O, no clock, no randomness. A compiled node is a function of an evaluation context.
In *traced* mode a compiled node returns ``(value, trace)`` where trace mirrors the value
(dict → dict of traces, list → list of traces, anything else → the Origin that produced it),
so a trace can say, for every element, which rule line made it. Both modes come from the same
compile function; the plain mode pays nothing for tracing.

Syntax (full reference with examples: mappings/README.md):
  "$.a.b[0]"          value at a path of the current record; "$name.x" of a bound variable
  "x {$.a} y"         string interpolation (null placeholder → whole string null)
  "$$text"            a literal string starting with "$"
  {$ref: kind, id: e} reference to the resource a rule with identity `kind` makes for id e
  {$lookup: table, key: e, default: v}   terminology / value table
  {$each: e, as: n, let: {...}, do: t}   one item of t per element of e (spliced into lists)
  {$if: c, then: t, else: t}             conditional template
  {$find: e, where: {field: e}}          first element of list e whose fields equal the values
  {$eq|$ne: [a, b]}, {$and|$or: [..]}, {$not: e}, {$exists: e}, {$is_integer: e},
  {$integer: e}, {$min|$max: e}, {$coalesce: [..]}, {$literal: v}, {$produced: true}
  {$number: e}                           the number a decimal text stands for ("36.7" → 36.7,
                                         "80" → 80); numbers pass through; anything else → null
Null, empty lists and empty objects are pruned from the output, as FHIR forbids them.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
import uuid
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson

from fhirbridge.errors import MappingProblem
from fhirbridge.mapping.yamlsrc import escape_pointer_token, line_of

Fn = Callable[["Ctx"], Any]


@dataclass(frozen=True, slots=True)
class Origin:
    """Where an output element comes from: rule file, line, rule name and JSON pointer."""

    file: str
    line: int | None
    rule: str
    pointer: str
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rule": self.rule, "file": self.file, "pointer": self.pointer}
        if self.line is not None:
            out["line"] = self.line
        if self.detail:
            out["detail"] = self.detail
        return out


@dataclass(frozen=True, slots=True)
class Unmapped:
    """A non-null key that a table did not contain (kept as text, never given a code)."""

    table: str
    rule: str
    file: str
    line: int | None


@dataclass(slots=True)
class Ctx:
    """Evaluation state of one submission: variables, per-run indexes, what was produced."""

    vars: dict[str, Any]
    produced: list[tuple[str, str]] = field(default_factory=list)
    unmapped: list[Unmapped] = field(default_factory=list)
    indexes: dict[tuple[int, int], dict[tuple[Any, ...], Any]] = field(default_factory=dict)
    # Resource ids made in this run by their UUIDv5 name: a resource's id is asked for again
    # by every reference to it (about three times per resource in a submission).
    ids: dict[str, str] = field(default_factory=dict)


# The first hex digit of the clock_seq field with the RFC 4122 variant bits (10xx) set.
_VARIANT_DIGIT = {digit: "89ab"[int(digit, 16) & 0x3] for digit in "0123456789abcdef"}


def _uuid5(namespace: bytes, name: str) -> str:
    """``str(uuid.uuid5(UUID(bytes=namespace), name))`` without the UUID objects (a third of
    the time).

    RFC 4122 section 4.3: SHA-1 of namespace and name, first 16 bytes, version 5, RFC variant.
    """
    h = hashlib.sha1(namespace + name.encode()).hexdigest()
    return f"{h[:8]}-{h[8:12]}-5{h[13:16]}-{_VARIANT_DIGIT[h[16]]}{h[17:20]}-{h[20:32]}"


@dataclass
class Identity:
    """How ids and the primary identifier are made: UUIDv5 of source|kind|key."""

    namespace: uuid.UUID
    system_template: str  # with {source} and {kind}
    _namespace_bytes: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._namespace_bytes = self.namespace.bytes

    def resource_id(self, source: str, kind: str, key: str) -> str:
        return _uuid5(self._namespace_bytes, f"{source}|{kind}|{key}")

    def run_resource_id(self, ctx: Ctx, source: str, kind: str, key: str) -> str:
        """:meth:`resource_id`, remembered for the rest of the run in ``ctx``."""
        name = f"{source}|{kind}|{key}"
        rid = ctx.ids.get(name)
        if rid is None:
            rid = ctx.ids[name] = _uuid5(self._namespace_bytes, name)
        return rid

    def system(self, source: str, kind: str) -> str:
        return self.system_template.format(source=source, kind=kind)


@dataclass
class Table:
    """A terminology or value table: key → value (a Coding, a code, any JSON)."""

    name: str
    file: str
    rows: dict[str, Any]
    lines: dict[str, int]
    description: str = ""
    source_system: str | None = None
    target_system: str | None = None
    _fresh_rows: dict[str, Callable[[], Any]] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    def fresh_rows(self) -> dict[str, Callable[[], Any]]:
        """Per key, a function giving a fresh copy of the row (made once per table)."""
        if self._fresh_rows is None:
            self._fresh_rows = {k: _copier(v) for k, v in self.rows.items()}
        return self._fresh_rows


@dataclass
class CompileEnv:
    """What the compiler knows about the pack while compiling one rule."""

    file: str
    rule: str
    lines: dict[str, int]
    tables: dict[str, Table]
    kinds: dict[str, str]  # identity kind → resourceType
    identity: Identity
    constants: dict[str, Any]
    variables: frozenset[str]
    problems: list[MappingProblem]

    def origin(self, pointer: str, detail: str = "") -> Origin:
        return Origin(self.file, line_of(self.lines, pointer), self.rule, pointer, detail)

    def problem(self, pointer: str, message: str) -> None:
        self.problems.append(
            MappingProblem(self.file, pointer, message, line_of(self.lines, pointer))
        )

    def with_vars(self, *names: str) -> CompileEnv:
        return CompileEnv(
            self.file,
            self.rule,
            self.lines,
            self.tables,
            self.kinds,
            self.identity,
            self.constants,
            self.variables | frozenset(names),
            self.problems,
        )


def is_empty(value: Any) -> bool:
    """Null, [] and {} (and "") are not allowed in FHIR JSON: such elements are pruned."""
    return value is None or value == [] or value == {} or value == ""


def kept(value: Any) -> bool:
    """``not is_empty(value)``, with the common case (a non-empty value) decided first.

    Every value here is JSON or YAML data, whose truth agrees with emptiness: a true value is
    never null, [], {} or "", and only a false one needs the comparisons.
    """
    return bool(value) or not (value is None or value == [] or value == {} or value == "")


def truthy(value: Any) -> bool:
    return not (value is None or value is False or is_empty(value))


# ---------------------------------------------------------------- paths

_PATH_RE = re.compile(
    r"^\$([A-Za-z_][A-Za-z0-9_]*)?((?:\.[A-Za-z_][A-Za-z0-9_-]*|\[(?:\d+|\*)\])*)$"
)
_STEP_RE = re.compile(r"\.([A-Za-z_][A-Za-z0-9_-]*)|\[(\d+|\*)\]")
_INTERP_RE = re.compile(r"\{(\$[^{}]*)\}")
_WILDCARD = object()


def parse_path(text: str) -> tuple[str, list[str | int | object]] | None:
    """`$var.a[0][*].b` → ("var", ["a", 0, WILDCARD, "b"]); `$` alone is the current record."""
    match = _PATH_RE.match(text)
    if match is None:
        return None
    var = match.group(1) or ""
    steps: list[str | int | object] = []
    for name, index in _STEP_RE.findall(match.group(2)):
        if name:
            steps.append(name)
        elif index == "*":
            steps.append(_WILDCARD)
        else:
            steps.append(int(index))
    return var, steps


def _walk(value: Any, steps: list[str | int | object]) -> Any:
    for i, step in enumerate(steps):
        if value is None:
            return None
        if step is _WILDCARD:
            if not isinstance(value, list):
                return None
            rest = steps[i + 1 :]
            out: list[Any] = []
            for item in value:
                got = _walk(item, rest)
                if isinstance(got, list) and any(s is _WILDCARD for s in rest):
                    out.extend(got)
                elif got is not None:
                    out.append(got)
            return out
        if isinstance(step, str):
            value = value.get(step) if isinstance(value, dict) else None
        else:
            assert isinstance(step, int)
            value = (
                value[step]
                if isinstance(value, list) and -len(value) <= step < len(value)
                else None
            )
    return value


def walk_with_paths(
    value: Any, steps: Sequence[str | int | object], prefix: str
) -> list[tuple[Any, str]]:
    """Like a path lookup, but gives (item, JSON path) pairs; lists at the end are expanded.

    Nulls are never given. Document order: the items reached are expanded step by step, in
    order, which is the order of a depth-first walk.
    """
    level: list[tuple[Any, str]] = [] if value is None else [(value, prefix)]
    for step in steps:
        reached: list[tuple[Any, str]] = []
        if step is _WILDCARD:
            for node, path in level:
                if isinstance(node, list):
                    for i, item in enumerate(node):
                        if item is not None:
                            reached.append((item, f"{path}[{i}]"))
        elif isinstance(step, str):
            for node, path in level:
                if isinstance(node, dict):
                    child = node.get(step)
                    if child is not None:
                        reached.append((child, f"{path}.{step}" if path else step))
        else:
            assert isinstance(step, int)
            for node, path in level:
                if isinstance(node, list) and -len(node) <= step < len(node):
                    child = node[step]
                    if child is not None:
                        reached.append((child, f"{path}[{step}]"))
        level = reached
        if not level:
            return level
    out: list[tuple[Any, str]] = []
    for node, path in level:
        if isinstance(node, list):
            for i, item in enumerate(node):
                if item is not None:
                    out.append((item, f"{path}[{i}]"))
        else:
            out.append((node, path))
    return out


def walk_values(value: Any, steps: Sequence[str | int | object]) -> list[Any]:
    """The items :func:`walk_with_paths` gives, in the same order, without their paths."""
    level: list[Any] = [] if value is None else [value]
    for step in steps:
        reached: list[Any] = []
        if step is _WILDCARD:
            for node in level:
                if isinstance(node, list):
                    reached.extend(item for item in node if item is not None)
        elif isinstance(step, str):
            for node in level:
                if isinstance(node, dict):
                    child = node.get(step)
                    if child is not None:
                        reached.append(child)
        else:
            assert isinstance(step, int)
            for node in level:
                if isinstance(node, list) and -len(node) <= step < len(node):
                    child = node[step]
                    if child is not None:
                        reached.append(child)
        level = reached
        if not level:
            return level
    out: list[Any] = []
    for node in level:
        if isinstance(node, list):
            out.extend(item for item in node if item is not None)
        else:
            out.append(node)
    return out


# ---------------------------------------------------------------- compiler

_OPS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    # op: (required option keys, allowed option keys)
    "$ref": (frozenset({"id"}), frozenset({"id"})),
    "$lookup": (frozenset({"key"}), frozenset({"key", "default"})),
    "$each": (frozenset({"do"}), frozenset({"do", "as", "let"})),
    "$if": (frozenset({"then"}), frozenset({"then", "else"})),
    "$find": (frozenset({"where"}), frozenset({"where"})),
    "$eq": (frozenset(), frozenset()),
    "$ne": (frozenset(), frozenset()),
    "$and": (frozenset(), frozenset()),
    "$or": (frozenset(), frozenset()),
    "$not": (frozenset(), frozenset()),
    "$exists": (frozenset(), frozenset()),
    "$is_integer": (frozenset(), frozenset()),
    "$integer": (frozenset(), frozenset()),
    "$min": (frozenset(), frozenset()),
    "$max": (frozenset(), frozenset()),
    "$coalesce": (frozenset(), frozenset()),
    "$literal": (frozenset(), frozenset()),
    "$produced": (frozenset(), frozenset({"types"})),
    "$number": (frozenset(), frozenset()),
}
_SPREADING_OPS = frozenset({"$each", "$produced"})
OP_NAMES = frozenset(_OPS)


# Untraced compiled nodes whose value is known when the pack loads, with that value: a literal,
# a constant, or a template part holding no path and no operator. Such a part is built once, at
# load; every call gives a fresh copy of it (scalars are shared: they are immutable).
_STATIC: weakref.WeakKeyDictionary[Fn, Any] = weakref.WeakKeyDictionary()
_DYNAMIC = object()


def _const(value: Any) -> Fn:
    def const(ctx: Ctx) -> Any:
        return value

    _STATIC[const] = value
    return const


def _freeze_literal(value: Any) -> Fn:
    """Literals are rebuilt per call for containers, so no two resources share a mutable object."""
    return _static(value)


def _static(value: Any) -> Fn:
    """A compiled node giving `value` at every call: a fresh deep copy of a container."""
    if not isinstance(value, _CONTAINERS):
        return _const(value)
    fresh_copy = _copier(value)

    def fresh(ctx: Ctx) -> Any:
        return fresh_copy()

    _STATIC[fresh] = value
    return fresh


_CONTAINERS = (dict, list)  # a tuple: `dict | list` would make a new union at every test


def _copy(value: Any) -> Any:
    # Leaves are tested here rather than in a call each: most table rows are flat Codings.
    if isinstance(value, dict):
        return {k: _copy(v) if isinstance(v, _CONTAINERS) else v for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) if isinstance(v, _CONTAINERS) else v for v in value]
    return value


def _same(value: Any) -> Any:
    return value


def _copier(value: Any) -> Callable[[], Any]:
    """A function giving a fresh deep copy of `value` (as :func:`_copy`) at every call.

    When orjson gives the value back exactly (JSON types only, 64-bit integers, finite floats,
    text that encodes), the copy is parsed from its JSON made once here: two to three times as
    fast as walking it. Anything else YAML can hold (a date, a big integer) is walked. A scalar
    is given as it is (as :func:`_copy` does).
    """
    if not isinstance(value, _CONTAINERS):
        return functools.partial(_same, value)
    if _json_exact(value):
        try:
            blob = orjson.dumps(value)
        except orjson.JSONEncodeError:  # a lone surrogate, nesting deeper than orjson allows
            pass
        else:
            return functools.partial(orjson.loads, blob)
    return functools.partial(_copy, value)


def _json_exact(value: Any) -> bool:
    kind = type(value)
    if value is None or kind is str or kind is bool:
        return True
    if kind is int:
        return bool(-(2**63) <= value < 2**64)
    if kind is float:
        return math.isfinite(value)
    if kind is list:
        return all(_json_exact(v) for v in value)
    if kind is dict:
        return all(type(k) is str and _json_exact(v) for k, v in value.items())
    return False


def _traced(fn: Fn, origin: Origin) -> Fn:
    return lambda ctx: (fn(ctx), origin)


def op_name(node: dict[str, Any]) -> str | None:
    ops = [k for k in node if isinstance(k, str) and k.startswith("$")]
    return ops[0] if len(ops) == 1 else (None if not ops else "|".join(sorted(ops)))


def compile_expr(node: Any, pointer: str, env: CompileEnv) -> Fn:
    """Compile a value-producing expression (untraced): paths, interpolations, ops, literals."""
    return _compile(node, pointer, env, traced=False)


def compile_template(node: Any, pointer: str, env: CompileEnv, traced: bool) -> Fn:
    """Compile an output template; in traced mode the result is (value, trace)."""
    return _compile(node, pointer, env, traced)


def _compile(node: Any, pointer: str, env: CompileEnv, traced: bool) -> Fn:
    if isinstance(node, str):
        fn = _compile_string(node, pointer, env)
        return _traced(fn, env.origin(pointer)) if traced else fn
    if isinstance(node, dict):
        name = op_name(node)
        if name is not None:
            return _compile_op(name, node, pointer, env, traced)
        return _compile_dict(node, pointer, env, traced)
    if isinstance(node, list):
        return _compile_list(node, pointer, env, traced)
    if node is None or isinstance(node, bool | int | float):
        fn = _const(node)
        return _traced(fn, env.origin(pointer)) if traced else fn
    env.problem(pointer, f"unsupported value of type {type(node).__name__}")
    return _const(None)


def _compile_string(text: str, pointer: str, env: CompileEnv) -> Fn:
    if text.startswith("$$"):
        return _const(text[1:])
    if text.startswith("$"):
        return _compile_path(text, pointer, env)
    if "{$" in text:
        parts: list[str | Fn] = []
        last = 0
        for match in _INTERP_RE.finditer(text):
            parts.append(text[last : match.start()])
            parts.append(_compile_path(match.group(1), pointer, env))
            last = match.end()
        parts.append(text[last:])

        def interpolate(ctx: Ctx) -> str | None:
            out = []
            for part in parts:
                if isinstance(part, str):
                    out.append(part)
                else:
                    value = part(ctx)
                    if value is None:
                        return None
                    out.append(_text(value))
            return "".join(out)

        return interpolate
    return _const(text)


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _compile_path(text: str, pointer: str, env: CompileEnv) -> Fn:
    parsed = parse_path(text)
    if parsed is None:
        env.problem(pointer, f"not a valid path expression: {text!r}")
        return _const(None)
    var, steps = parsed
    if var == "const":
        if not steps or not isinstance(steps[0], str) or steps[0] not in env.constants:
            env.problem(pointer, f"unknown constant in {text!r}")
            return _const(None)
        value = _walk(env.constants, steps)
        return _freeze_literal(value)
    if var not in env.variables:
        known = ", ".join(sorted("$" + v for v in env.variables))
        env.problem(pointer, f"unknown variable ${var} (known here: {known})")
        return _const(None)
    if not steps:
        return lambda ctx: ctx.vars[var]
    if len(steps) == 1 and isinstance(steps[0], str):
        key = steps[0]

        def field_of(ctx: Ctx) -> Any:
            value = ctx.vars[var]
            return value.get(key) if isinstance(value, dict) else None

        return field_of
    return lambda ctx: _walk(ctx.vars[var], steps)


def _compile_dict(node: dict[str, Any], pointer: str, env: CompileEnv, traced: bool) -> Fn:
    items: list[tuple[str, Fn]] = []
    for key, value in node.items():
        if not isinstance(key, str):
            env.problem(pointer, f"keys must be strings, got {key!r}")
            continue
        child = f"{pointer}/{escape_pointer_token(key)}"
        items.append((key, _compile(value, child, env, traced)))
    if not traced:
        known = [(key, _STATIC.get(fn, _DYNAMIC)) for key, fn in items]
        if all(value is not _DYNAMIC for _, value in known):
            return _static({key: value for key, value in known if kept(value)} or None)
        # Static scalars are stored as they are; everything else is called (fn not None).
        entries: list[tuple[str, Fn | None, Any]] = []
        for (key, fn), (_, value) in zip(items, known, strict=True):
            if value is _DYNAMIC or isinstance(value, dict | list):
                entries.append((key, fn, None))
            elif kept(value):
                entries.append((key, None, value))

        def build(ctx: Ctx) -> dict[str, Any] | None:
            out = {}
            for key, fn, value in entries:
                if fn is not None:
                    value = fn(ctx)
                    if not value and not kept(value):
                        continue
                out[key] = value
            return out or None

        return build

    def build_traced(ctx: Ctx) -> tuple[dict[str, Any] | None, dict[str, Any]]:
        out: dict[str, Any] = {}
        trace: dict[str, Any] = {}
        for key, fn in items:
            value, sub = fn(ctx)
            if not is_empty(value):
                out[key] = value
                trace[key] = sub
        return (out or None), trace

    return build_traced


def _compile_list(node: list[Any], pointer: str, env: CompileEnv, traced: bool) -> Fn:
    items: list[tuple[bool, Fn]] = []
    for i, value in enumerate(node):
        spread = isinstance(value, dict) and op_name(value) in _SPREADING_OPS
        items.append((spread, _compile(value, f"{pointer}/{i}", env, traced)))
    if not traced:
        known = [_DYNAMIC if spread else _STATIC.get(fn, _DYNAMIC) for spread, fn in items]
        if all(value is not _DYNAMIC for value in known):
            return _static([value for value in known if kept(value)] or None)

        def build(ctx: Ctx) -> list[Any] | None:
            out: list[Any] = []
            for spread, fn in items:
                value = fn(ctx)
                if spread and isinstance(value, list):
                    out.extend(value)
                elif value or kept(value):
                    out.append(value)
            return out or None

        return build

    def build_traced(ctx: Ctx) -> tuple[list[Any] | None, list[Any]]:
        out: list[Any] = []
        trace: list[Any] = []
        for spread, fn in items:
            value, sub = fn(ctx)
            if spread and isinstance(value, list):
                out.extend(value)
                trace.extend(sub if isinstance(sub, list) else [sub] * len(value))
            elif not is_empty(value):
                out.append(value)
                trace.append(sub)
        return (out or None), trace

    return build_traced


def _args(node: dict[str, Any], name: str, pointer: str, env: CompileEnv, count: int) -> list[Fn]:
    raw = node[name]
    ptr = f"{pointer}/{escape_pointer_token(name)}"
    if not isinstance(raw, list) or len(raw) != count:
        env.problem(ptr, f"{name} takes a list of {count} expressions")
        return [_const(None)] * count
    return [compile_expr(v, f"{ptr}/{i}", env) for i, v in enumerate(raw)]


def _compile_op(name: str, node: dict[str, Any], pointer: str, env: CompileEnv, traced: bool) -> Fn:
    if name not in _OPS:
        env.problem(pointer, f"unknown operator {name} (known: {', '.join(sorted(_OPS))})")
        return (lambda ctx: (None, None)) if traced else _const(None)
    required, allowed = _OPS[name]
    options = {k for k in node if k != name}
    for missing in sorted(required - options):
        env.problem(pointer, f"{name} needs `{missing}`")
    for extra in sorted(options - allowed):
        env.problem(
            pointer, f"{name} does not take `{extra}` (allowed: {sorted(allowed) or 'none'})"
        )
    ptr = f"{pointer}/{escape_pointer_token(name)}"

    # Structural operators carry output templates inside them: they pass `traced` down.
    if name == "$each":
        return _compile_each(node, pointer, env, traced)
    if name == "$if":
        cond = compile_expr(node["$if"], ptr, env)
        then = _compile(node.get("then"), f"{pointer}/then", env, traced)
        other = _compile(node.get("else"), f"{pointer}/else", env, traced)
        return lambda ctx: then(ctx) if truthy(cond(ctx)) else other(ctx)

    fn = _compile_value_op(name, node, pointer, ptr, env)
    if not traced:
        return fn
    detail = ""
    if name == "$lookup" and isinstance(node["$lookup"], str):
        table = env.tables.get(node["$lookup"])
        detail = f"table {node['$lookup']}" + (f" ({table.file})" if table else "")
    return _traced(fn, env.origin(pointer, detail))


def _compile_each(node: dict[str, Any], pointer: str, env: CompileEnv, traced: bool) -> Fn:
    source = compile_expr(node["$each"], f"{pointer}/$each", env)
    alias = node.get("as", "item")
    if not isinstance(alias, str) or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", alias):
        env.problem(f"{pointer}/as", "`as` must be a variable name")
        alias = "item"
    lets, inner_env = _compile_lets(node.get("let"), f"{pointer}/let", env.with_vars(alias))
    body = _compile(node.get("do"), f"{pointer}/do", inner_env, traced)

    def each(ctx: Ctx) -> Any:
        items = source(ctx)
        if items is None:
            return (None, []) if traced else None
        if not isinstance(items, list):
            items = [items]
        saved = dict(ctx.vars)
        out: list[Any] = []
        trace: list[Any] = []
        try:
            for item in items:
                ctx.vars[alias] = item
                for let_name, let_fn in lets:
                    ctx.vars[let_name] = let_fn(ctx)
                if traced:
                    value, sub = body(ctx)
                    if not is_empty(value):
                        out.append(value)
                        trace.append(sub)
                else:
                    value = body(ctx)
                    if value or kept(value):
                        out.append(value)
        finally:
            ctx.vars = saved
        return (out, trace) if traced else out

    return each


def _compile_lets(
    raw: Any, pointer: str, env: CompileEnv
) -> tuple[list[tuple[str, Fn]], CompileEnv]:
    """`let: {name: expr}` bindings, each seeing the ones before it."""
    if raw is None:
        return [], env
    if not isinstance(raw, dict):
        env.problem(pointer, "`let` must map variable names to expressions")
        return [], env
    lets: list[tuple[str, Fn]] = []
    for name, expr in raw.items():
        if not isinstance(name, str) or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", name):
            env.problem(pointer, f"{name!r} is not a variable name")
            continue
        lets.append((name, compile_expr(expr, f"{pointer}/{escape_pointer_token(name)}", env)))
        env = env.with_vars(name)
    return lets, env


def _compile_value_op(
    name: str, node: dict[str, Any], pointer: str, ptr: str, env: CompileEnv
) -> Fn:
    if name == "$ref":
        kind = node["$ref"]
        if not isinstance(kind, str) or kind not in env.kinds:
            env.problem(
                ptr,
                f"$ref names unknown identity kind {kind!r} "
                f"(kinds: {', '.join(sorted(env.kinds))})",
            )
            return _const(None)
        rtype = env.kinds[kind]
        raw_id = node.get("id")
        # A list of expressions is a composite key, joined as the rule's identity key is.
        parts = raw_id if isinstance(raw_id, list) else [raw_id]
        key_fns = [compile_expr(p, f"{pointer}/id", env) for p in parts]
        identity = env.identity
        if len(key_fns) == 1:
            (key_fn,) = key_fns

            def ref_one(ctx: Ctx) -> dict[str, str] | None:
                value = key_fn(ctx)
                if value is None:
                    return None
                rid = identity.run_resource_id(ctx, ctx.vars["source"], kind, _text(value))
                return {"reference": f"{rtype}/{rid}"}

            return ref_one

        def ref(ctx: Ctx) -> dict[str, str] | None:
            values = [fn(ctx) for fn in key_fns]
            if values[0] is None:
                return None
            key = "|".join("" if v is None else _text(v) for v in values)
            rid = identity.run_resource_id(ctx, ctx.vars["source"], kind, key)
            return {"reference": f"{rtype}/{rid}"}

        return ref

    if name == "$lookup":
        table_name = node["$lookup"]
        table = env.tables.get(table_name) if isinstance(table_name, str) else None
        if table is None:
            env.problem(
                ptr, f"unknown table {table_name!r} (tables: {', '.join(sorted(env.tables))})"
            )
            return _const(None)
        key_fn = compile_expr(node.get("key"), f"{pointer}/key", env)
        has_default = "default" in node
        # Each row (and the default) is a fresh copy at every use: no two resources share one.
        rows = table.fresh_rows()
        fresh_default = _copier(node.get("default"))
        unmapped = Unmapped(table.name, env.rule, env.file, line_of(env.lines, pointer))

        def lookup(ctx: Ctx) -> Any:
            key = key_fn(ctx)
            if key is None:
                return fresh_default()
            key = _text(key)
            row = rows.get(key)
            if row is not None:
                return row()
            if not has_default:
                ctx.unmapped.append(unmapped)
            return fresh_default()

        return lookup

    if name == "$find":
        source = compile_expr(node["$find"], ptr, env)
        where = node.get("where")
        if not isinstance(where, dict) or not where:
            env.problem(f"{pointer}/where", "`where` must map field names to expressions")
            return _const(None)
        fields = list(where)
        value_fns = [
            compile_expr(v, f"{pointer}/where/{escape_pointer_token(k)}", env)
            for k, v in where.items()
        ]
        index_key = (id(node), len(fields))

        def find(ctx: Ctx) -> Any:
            # Indexed once per run: linear in the collection, not quadratic in lookups.
            index = ctx.indexes.get(index_key)
            if index is None:
                index = {}
                items = source(ctx)
                for item in items if isinstance(items, list) else []:
                    if isinstance(item, dict):
                        index.setdefault(tuple(item.get(f) for f in fields), item)
                ctx.indexes[index_key] = index
            return index.get(tuple(fn(ctx) for fn in value_fns))

        return find

    if name in ("$eq", "$ne"):
        a, b = _args(node, name, pointer, env, 2)
        if name == "$eq":
            return lambda ctx: a(ctx) == b(ctx)
        return lambda ctx: a(ctx) != b(ctx)

    if name in ("$and", "$or", "$coalesce"):
        raw = node[name]
        if not isinstance(raw, list) or not raw:
            env.problem(ptr, f"{name} takes a non-empty list of expressions")
            return _const(None)
        fns = [compile_expr(v, f"{ptr}/{i}", env) for i, v in enumerate(raw)]
        if name == "$and":
            return lambda ctx: all(truthy(f(ctx)) for f in fns)
        if name == "$or":
            return lambda ctx: any(truthy(f(ctx)) for f in fns)

        def coalesce(ctx: Ctx) -> Any:
            for f in fns:
                value = f(ctx)
                if value is not None:
                    return value
            return None

        return coalesce

    if name == "$literal":
        return _freeze_literal(node["$literal"])

    if name == "$produced":
        types = node.get("types")
        wanted = frozenset(types) if isinstance(types, list) else None

        def produced(ctx: Ctx) -> list[dict[str, str]]:
            return [
                {"reference": f"{t}/{i}"} for t, i in ctx.produced if wanted is None or t in wanted
            ]

        return produced

    arg = compile_expr(node[name], ptr, env)
    if name == "$not":
        return lambda ctx: not truthy(arg(ctx))
    if name == "$exists":
        return lambda ctx: arg(ctx) is not None
    if name == "$is_integer":
        return lambda ctx: _is_integer(arg(ctx))
    if name == "$integer":
        return lambda ctx: int(v) if _is_integer(v := arg(ctx)) else None
    if name == "$number":
        return lambda ctx: _number(arg(ctx))
    if name in ("$min", "$max"):
        pick = min if name == "$min" else max

        def extreme(ctx: Ctx) -> Any:
            values = arg(ctx)
            if not isinstance(values, list):
                return values
            values = [v for v in values if v is not None]
            if not values:
                return None
            return pick(values, key=_sort_key)

        return extreme
    raise AssertionError(name)  # pragma: no cover - every op in _OPS is handled above


def _is_integer(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and value.is_integer())


_DECIMAL_RE = re.compile(r"^[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?$")
_INTEGER_RE = re.compile(r"^[+-]?[0-9]+$")


def _number(value: Any) -> int | float | None:
    """A number from a decimal text: whole → int, with a point or exponent → float.

    So "80" gives 80 and "80.0" gives 80.0, as a JSON parser reads those numbers; a sign, leading
    zeros and a bare point (".5", "5.") are accepted too.

    Exports that carry every value as text (REDCap JSON) need this for FHIR decimals and
    integers. Numbers pass through; booleans, other text and non-finite results give null.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if not isinstance(value, str) or not _DECIMAL_RE.match(value):
        return None
    if _INTEGER_RE.match(value):
        try:
            return int(value)
        except ValueError:  # beyond Python's int-from-text digit limit
            return None
    number = float(value)
    return number if math.isfinite(number) else None


def _sort_key(value: Any) -> Any:
    """Order date-times by instant (offsets differ), dates and numbers naturally."""
    if isinstance(value, str) and "T" in value:
        try:
            return (0, datetime.fromisoformat(value).timestamp(), value)
        except ValueError:
            return (1, 0.0, value)
    if isinstance(value, str):
        # A partial or full date sorts as its first instant, in UTC.
        return (0, _date_start(value), value)
    return (0, float(value), "")


def _date_start(value: str) -> float:
    parts = value.split("-")
    try:
        year = int(parts[0])
        month = int(parts[1]) if len(parts) > 1 else 1
        day = int(parts[2]) if len(parts) > 2 else 1
        return datetime.fromisoformat(
            f"{year:04d}-{month:02d}-{day:02d}T00:00:00+00:00"
        ).timestamp()
    except (ValueError, IndexError):
        return 0.0
