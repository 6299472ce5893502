"""Static checks of a loaded pack, beyond what loading checks: the integrator's `mappings validate`.

- every source field a rule reads exists in the source JSON Schema (a misspelled field is an
  error, not a silently empty element);
- every FHIR element a template writes exists on its R4 type (from the R4B models), with the
  right cardinality;
- every code system a Coding or Quantity uses, in templates and tables, is known (standard
  systems, terminology.hl7.org, or one the pack declares under `code_systems`);
- coverage: the source fields no rule or integrity rule reads (information, not an error).
Pure: reads only the pack already in memory.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from fhirbridge.fhir import structure
from fhirbridge.mapping.expr import OP_NAMES, op_name, parse_path
from fhirbridge.mapping.pack import MappingPack, RuleSource
from fhirbridge.mapping.yamlsrc import escape_pointer_token, line_of

KNOWN_SYSTEMS = frozenset(
    {
        "http://snomed.info/sct",
        "http://loinc.org",
        "http://unitsofmeasure.org",
        "http://fdasis.nlm.nih.gov",
        "http://www.nlm.nih.gov/research/umls/rxnorm",
        "http://www.ama-assn.org/go/cpt",
        "http://hl7.org/fhir/sid/icd-10-cm",
        "http://hl7.org/fhir/sid/icd-10",
        "http://hl7.org/fhir/sid/ndc",
        "http://nucc.org/provider-taxonomy",
        "urn:ietf:bcp:47",
    }
)
KNOWN_PREFIXES = ("http://terminology.hl7.org/CodeSystem/", "http://hl7.org/fhir/", "urn:oid:")
_ANY = object()  # a schema position the checker cannot see into (no properties declared)
_INTERP = re.compile(r"\{(\$[^{}]*)\}")
_CODED_TYPES = frozenset({"Coding", "Quantity"})


@dataclass(frozen=True, slots=True)
class Finding:
    """One result of a check, located by file, line, rule and JSON pointer."""

    severity: str  # error | warning | information
    file: str
    line: int | None
    rule: str
    pointer: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        rule = f" rule {self.rule}:" if self.rule else ""
        return f"{where}:{rule} {self.pointer or '/'}: {self.message}"


@dataclass
class Report:
    """All findings, and the source fields nothing reads."""

    findings: list[Finding] = field(default_factory=list)
    unread_fields: list[str] = field(default_factory=list)
    read_fields: set[str] = field(default_factory=set)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]


def check_pack(pack: MappingPack) -> Report:
    """Run every static check over a loaded pack."""
    report = Report()
    schema = _Schema(pack.source_schema)
    known = KNOWN_SYSTEMS | frozenset(pack.code_systems)
    for source in pack.rule_sources:
        for i, rule in enumerate(source.data["rules"]):
            _RuleChecker(pack, schema, source, i, rule, known, report).run()
    for table in pack.tables.values():
        for key, row in table.rows.items():
            pointer = f"/rows/{escape_pointer_token(key)}"
            for coding_pointer, system in _table_systems(row, pointer):
                if not _known_system(system, known):
                    report.findings.append(
                        Finding(
                            "error",
                            table.file,
                            line_of(table.lines, coding_pointer),
                            "",
                            coding_pointer,
                            f"unknown code system {system!r} (declare it under "
                            "code_systems in pack.yaml if it is a local one)",
                        )
                    )
    for expr in (pack.identity_source_path, pack.identity_patient_path):
        if expr:
            report.read_fields.add(_norm(expr))
    for path in pack.integrity.unique:
        report.read_fields.add(_norm(path))
    for ref in pack.integrity.references:
        report.read_fields.update({_norm(ref["from"]), _norm(ref["to"])})
        for key in ref.get("where") or {}:
            report.read_fields.add(_norm(ref["to"]).rsplit(".", 1)[0] + "." + key)
    for order in pack.integrity.order:
        base = _norm(order["each"])
        report.read_fields.update({f"{base}.{order['first']}", f"{base}.{order['then']}"})
    report.unread_fields = [f for f in schema.leaves() if not _is_read(f, report.read_fields)]
    return report


def _norm(path: str) -> str:
    return re.sub(r"\[\d+\]", "[*]", path)


def _is_read(leaf: str, read: set[str]) -> bool:
    return any(
        r == leaf
        or r.startswith(leaf + ".")
        or r.startswith(leaf + "[")
        or leaf.startswith(r + ".")
        or leaf.startswith(r + "[")
        for r in read
    )


def _known_system(system: str, known: frozenset[str]) -> bool:
    return (
        system in known
        or system.startswith(KNOWN_PREFIXES)
        or any(system.startswith(k + ":") for k in known if k.startswith("urn:"))
    )


def _table_systems(row: Any, pointer: str) -> Iterator[tuple[str, str]]:
    if isinstance(row, dict):
        if isinstance(row.get("system"), str) and "code" in row:
            yield f"{pointer}/system", row["system"]
        for key, value in row.items():
            if isinstance(value, dict | list):
                yield from _table_systems(value, f"{pointer}/{escape_pointer_token(key)}")
    elif isinstance(row, list):
        for i, item in enumerate(row):
            yield from _table_systems(item, f"{pointer}/{i}")


class _Schema:
    """Navigation through the source JSON Schema (local $refs, properties, items)."""

    def __init__(self, root: dict[str, Any]) -> None:
        self.root = root

    def resolve(self, node: Any) -> Any:
        seen = 0
        while isinstance(node, dict) and "$ref" in node and seen < 20:
            ref = node["$ref"]
            if not isinstance(ref, str) or not ref.startswith("#/"):
                return _ANY
            target: Any = self.root
            for part in ref[2:].split("/"):
                target = (
                    target.get(part.replace("~1", "/").replace("~0", "~"))
                    if isinstance(target, dict)
                    else None
                )
            node, seen = target, seen + 1
        return node

    def step(self, node: Any, step: Any) -> Any:
        """The schema of one path step below `node`: a node, _ANY, or None (does not exist)."""
        node = self.resolve(node)
        if node is _ANY or not isinstance(node, dict):
            return _ANY
        if isinstance(step, str):
            props = node.get("properties")
            if props is None:
                if node.get("type") == "array" or "items" in node:
                    return "list"
                return _ANY
            if step in props:
                return props[step]
            return (
                _ANY
                if node.get("additionalProperties", True) not in (False,) and not props
                else None
            )
        items = node.get("items")
        if items is None:
            return _ANY if node.get("type") in (None, "array") else None
        return items

    def walk(self, node: Any, steps: list[Any]) -> tuple[Any, int]:
        """Follow steps; returns (node, index of the first step that does not exist or -1)."""
        for i, s in enumerate(steps):
            nxt = self.step(node, s)
            if nxt is None or nxt == "list":
                return nxt, i
            node = nxt
            if node is _ANY:
                return _ANY, -1
        return node, -1

    def leaves(self) -> list[str]:
        out: list[str] = []

        def visit(node: Any, path: str, depth: int) -> None:
            node = self.resolve(node)
            if not isinstance(node, dict) or depth > 12:
                return
            props = node.get("properties")
            if props:
                for name, sub in props.items():
                    visit(sub, f"{path}.{name}" if path else name, depth + 1)
                return
            items = node.get("items")
            if (
                items is not None
                and isinstance(self.resolve(items), dict)
                and self.resolve(items).get("properties")
            ):
                visit(items, f"{path}[*]", depth + 1)
                return
            if path:
                out.append(path)

        visit(self.root, "", 0)
        return out


class _RuleChecker:
    """Checks one rule: source reads against the schema, writes against the R4 type."""

    def __init__(
        self,
        pack: MappingPack,
        schema: _Schema,
        source: RuleSource,
        index: int,
        rule: dict[str, Any],
        known: frozenset[str],
        report: Report,
    ) -> None:
        self.pack, self.schema, self.source, self.rule = pack, schema, source, rule
        self.known, self.report = known, report
        self.base = f"/rules/{index}"
        self.name = str(rule.get("name", ""))

    def find(self, severity: str, pointer: str, message: str) -> None:
        self.report.findings.append(
            Finding(
                severity,
                self.source.file,
                line_of(self.source.lines, pointer),
                self.name,
                pointer,
                message,
            )
        )

    def run(self) -> None:
        root = self.schema.root
        env: dict[str, tuple[Any, str]] = {"submission": (root, "")}
        item: tuple[Any, str] = (root, "")
        if "for_each" in self.rule:
            item = self.read(
                self.rule["for_each"].replace("$.", "$submission.", 1)
                if self.rule["for_each"].startswith("$.")
                else self.rule["for_each"],
                f"{self.base}/for_each",
                env,
                as_items=True,
            )
        env[""] = item
        if self.rule.get("as"):
            env[self.rule["as"]] = item
        if "when" in self.rule:
            self.reads(self.rule["when"], f"{self.base}/when", env)
        for name, expr in (self.rule.get("let") or {}).items():
            env[name] = self.binding(expr, f"{self.base}/let/{escape_pointer_token(name)}", env)
        key = self.rule["identity"]["key"]
        for i, k in enumerate(key if isinstance(key, list) else [key]):
            self.reads(
                k, f"{self.base}/identity/key" + (f"/{i}" if isinstance(key, list) else ""), env
            )
        resource = self.rule["resource"]
        if not structure.is_type(resource):
            self.find("error", f"{self.base}/resource", f"{resource} is not an R4 resource type")
            return
        self.template(self.rule["template"], f"{self.base}/template", env, resource, False)

    # ---------------------------------------------------------- source reads

    def read(
        self, text: str, pointer: str, env: dict[str, tuple[Any, str]], as_items: bool = False
    ) -> tuple[Any, str]:
        """Check one path expression; return the schema node it reaches and its field path."""
        parsed = parse_path(text)
        if parsed is None:
            return _ANY, ""
        var, steps = parsed
        if var not in env:
            return _ANY, ""
        node, where = env[var]
        if node is _ANY:
            return _ANY, ""
        reached, bad = self.schema.walk(node, steps)
        path = where
        for s in steps[: (bad if bad >= 0 else len(steps))]:
            path = (f"{path}.{s}" if path else str(s)) if isinstance(s, str) else f"{path}[*]"
        if bad >= 0:
            step = steps[bad]
            if reached == "list":
                self.find(
                    "error",
                    pointer,
                    f"{path or 'the document'} is a list: write "
                    f"{path}[*].{step} or {path}[0].{step}"
                    if isinstance(step, str)
                    else f"{path} is a list",
                )
            else:
                self.find(
                    "error",
                    pointer,
                    f"source field {step!r} does not exist in "
                    f"{self.pack.source_schema_file} at {path or 'the top level'}",
                )
            return _ANY, ""
        if path and not as_items:  # iterating over a list reads none of its fields
            self.report.read_fields.add(path)
        if as_items and reached is not _ANY:
            resolved = self.schema.resolve(reached)
            if isinstance(resolved, dict) and "items" in resolved:
                return resolved["items"], f"{path}[*]"
        return reached, path

    def reads(self, node: Any, pointer: str, env: dict[str, tuple[Any, str]]) -> None:
        """Check every path inside an expression (strings, interpolations, operator args)."""
        if isinstance(node, str):
            if node.startswith("$$"):
                return
            if node.startswith("$"):
                self.read(node, pointer, env)
            for match in _INTERP.finditer(node):
                self.read(match.group(1), pointer, env)
        elif isinstance(node, dict):
            if op_name(node) == "$find":
                self.find_op(node, pointer, env)
                return
            for key, value in node.items():
                self.reads(value, f"{pointer}/{escape_pointer_token(key)}", env)
        elif isinstance(node, list):
            for i, value in enumerate(node):
                self.reads(value, f"{pointer}/{i}", env)

    def find_op(
        self, node: dict[str, Any], pointer: str, env: dict[str, tuple[Any, str]]
    ) -> tuple[Any, str]:
        items = (_ANY, "")
        if isinstance(node["$find"], str):
            items = self.read(node["$find"], f"{pointer}/$find", env, as_items=True)
        for key, value in (node.get("where") or {}).items():
            ptr = f"{pointer}/where/{escape_pointer_token(key)}"
            if items[0] is not _ANY and self.schema.step(items[0], key) is None:
                self.find(
                    "error",
                    ptr,
                    f"source field {key!r} does not exist in "
                    f"{self.pack.source_schema_file} at {items[1]}",
                )
            elif items[1]:
                self.report.read_fields.add(f"{items[1]}.{key}")
            self.reads(value, ptr, env)
        return items

    def binding(self, expr: Any, pointer: str, env: dict[str, tuple[Any, str]]) -> tuple[Any, str]:
        """The schema node a `let` or `as` name stands for (or _ANY when not a plain path)."""
        if isinstance(expr, dict) and op_name(expr) == "$find":
            return self.find_op(expr, pointer, env)
        if isinstance(expr, str) and expr.startswith("$") and not expr.startswith("$$"):
            return self.read(expr, pointer, env)
        self.reads(expr, pointer, env)
        return _ANY, ""

    # ---------------------------------------------------------- FHIR writes

    def template(
        self,
        node: Any,
        pointer: str,
        env: dict[str, tuple[Any, str]],
        ftype: str | None,
        is_list: bool,
    ) -> None:
        """Check a template node written at an element of FHIR type `ftype`."""
        if isinstance(node, dict) and op_name(node) in OP_NAMES:
            self.template_op(node, pointer, env, ftype, is_list)
            return
        if isinstance(node, list):
            if not is_list:
                self.find(
                    "error",
                    pointer,
                    f"{ftype or 'this element'} holds one value (0..1), not a list",
                )
            for i, item in enumerate(node):
                self.template(item, f"{pointer}/{i}", env, ftype, False)
            return
        if not isinstance(node, dict):
            self.reads(node, pointer, env)
            return
        if ftype is None:
            self.find("error", pointer, "a primitive element cannot hold an object")
            return
        if is_list:
            self.find("error", pointer, f"this element is a list of {ftype}: write [ {{...}} ]")
        known = structure.elements(ftype)
        for key, value in node.items():
            ptr = f"{pointer}/{escape_pointer_token(key)}"
            if key not in known:
                hint = _closest(key, known)
                self.find(
                    "error",
                    ptr,
                    f"{ftype} has no element {key!r} in FHIR R4"
                    + (f" (did you mean {hint!r}?)" if hint else ""),
                )
                self.reads(value, ptr, env)
                continue
            element = known[key]
            if key == "system" and ftype in _CODED_TYPES:
                self.system(value, ptr)
            self.template(value, ptr, env, element.type_name, element.is_list)

    def template_op(
        self,
        node: dict[str, Any],
        pointer: str,
        env: dict[str, tuple[Any, str]],
        ftype: str | None,
        is_list: bool,
    ) -> None:
        op = op_name(node)
        if op == "$if":
            self.reads(node["$if"], f"{pointer}/$if", env)
            for branch in ("then", "else"):
                if branch in node:
                    self.template(node[branch], f"{pointer}/{branch}", env, ftype, is_list)
        elif op == "$each":
            inner = dict(env)
            item = (
                self.read(node["$each"], f"{pointer}/$each", env, as_items=True)
                if isinstance(node["$each"], str)
                else (_ANY, "")
            )
            inner[str(node.get("as", "item"))] = item
            for name, expr in (node.get("let") or {}).items():
                inner[name] = self.binding(
                    expr, f"{pointer}/let/{escape_pointer_token(name)}", inner
                )
            self.template(node.get("do"), f"{pointer}/do", inner, ftype, False)
        else:
            if op == "$ref" and ftype not in (None, "Reference"):
                self.find("error", pointer, f"$ref makes a Reference, but this element is {ftype}")
            self.reads(node, pointer, env)

    def system(self, value: Any, pointer: str) -> None:
        system = value
        if isinstance(value, str) and value.startswith("$const."):
            system = self.pack.constants.get(value[len("$const.") :])
        if (
            isinstance(system, str)
            and not system.startswith("$")
            and "{$" not in system
            and not _known_system(system, self.known)
        ):
            self.find(
                "error",
                pointer,
                f"unknown code system {system!r} (declare it under "
                "code_systems in pack.yaml if it is a local one)",
            )


def _closest(name: str, known: dict[str, Any]) -> str | None:
    import difflib

    match = difflib.get_close_matches(name, list(known), n=1, cutoff=0.75)
    return match[0] if match else None
