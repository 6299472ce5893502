"""Load a mapping pack from disk (the only I/O in mapping/) and compile it once.

A pack is a folder: pack.yaml (what to load, identity, integrity rules), the source JSON Schema,
terminology tables and rule files. Every file is checked against its JSON Schema and every
expression is compiled; all problems are collected and raised together as a MappingConfigError
naming file, JSON pointer and line.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema

from fhirbridge.errors import MappingConfigError, MappingProblem
from fhirbridge.mapping.expr import (
    CompileEnv,
    Fn,
    Identity,
    Table,
    compile_expr,
    compile_template,
    parse_path,
)
from fhirbridge.mapping.r4 import identifier_cardinality
from fhirbridge.mapping.yamlsrc import escape_pointer_token, line_of, load_yaml

BUILTIN_VARIABLES = frozenset({"", "submission", "source", "now", "id", "submission_hash"})


@cache
def _meta_schema(name: str) -> jsonschema.Draft202012Validator:
    text = resources.files("fhirbridge.schemas").joinpath(name).read_text(encoding="utf-8")
    schema = json.loads(text)
    return jsonschema.Draft202012Validator(schema)


@dataclass
class CompiledRule:
    """One rule: for each source item (optionally filtered), one resource from a template."""

    name: str
    file: str
    pointer: str
    line: int | None
    resource_line: int | None
    identity_line: int | None
    resource: str
    kind: str
    for_each: tuple[str, list[Any]] | None
    alias: str | None
    when: Fn | None
    lets: list[tuple[str, Fn]]
    key: list[Fn]
    template: Fn
    template_traced: Fn


@dataclass(frozen=True)
class RuleSource:
    """A rule file as read from disk, kept for static checks (`fhirbridge mappings validate`)."""

    file: str
    data: dict[str, Any]
    lines: dict[str, int]


@dataclass
class Integrity:
    """Cross-record checks the JSON Schema cannot express (declared in pack.yaml)."""

    unique: list[str] = field(default_factory=list)
    references: list[dict[str, Any]] = field(default_factory=list)
    order: list[dict[str, str]] = field(default_factory=list)


@dataclass
class MappingPack:
    """A loaded, compiled pack, ready to map submissions."""

    name: str
    version: str
    directory: Path
    source_schema: dict[str, Any]
    source_schema_file: str
    identity: Identity
    source_expr: Fn
    patient_expr: Fn | None
    tables: dict[str, Table]
    rules: list[CompiledRule]
    integrity: Integrity
    constants: dict[str, Any]
    fixtures_dir: Path | None
    files: list[str]
    rule_sources: list[RuleSource] = field(default_factory=list)
    code_systems: list[str] = field(default_factory=list)
    identity_source_path: str = ""  # e.g. "source" (for coverage)
    identity_patient_path: str = ""
    manifest_lines: dict[str, int] = field(default_factory=dict)


def _schema_problems(
    data: Any, schema_name: str, file: str, lines: dict[str, int]
) -> list[MappingProblem]:
    problems = []
    for error in sorted(_meta_schema(schema_name).iter_errors(data), key=lambda e: list(e.path)):
        pointer = "".join(f"/{escape_pointer_token(p)}" for p in error.absolute_path)
        problems.append(MappingProblem(file, pointer, _describe(error), line_of(lines, pointer)))
    return problems


def _describe(error: jsonschema.ValidationError) -> str:
    """A schema error message for mapping files (these hold no patient data)."""
    if error.validator == "additionalProperties":
        return f"unknown key: {error.message.split('(')[-1].rstrip(')')}"
    return error.message


def load_pack(directory: Path | str) -> MappingPack:
    """Load, validate and compile the pack in `directory`; raise MappingConfigError if broken."""
    root = Path(directory).resolve()
    problems: list[MappingProblem] = []
    pack_file = root / "pack.yaml"
    if not pack_file.is_file():
        raise MappingConfigError([MappingProblem(str(pack_file), "", "pack.yaml not found")])
    manifest, manifest_lines = load_yaml(pack_file, "pack.yaml")
    problems += _schema_problems(manifest, "mapping-pack.schema.json", "pack.yaml", manifest_lines)
    if problems:
        raise MappingConfigError(problems)
    files = ["pack.yaml"]

    source_schema_file = manifest["source_schema"]
    source_schema = _load_source_schema(root, source_schema_file, problems)
    files.append(source_schema_file)

    tables: dict[str, Table] = {}
    for pattern in manifest["tables"]:
        matched = sorted(root.glob(pattern))
        if not matched and not any(c in pattern for c in "*?["):
            problems.append(
                MappingProblem(
                    "pack.yaml",
                    "/tables",
                    f"no file matches {pattern!r}",
                    line_of(manifest_lines, "/tables"),
                )
            )
        for path in matched:
            rel = path.relative_to(root).as_posix()
            files.append(rel)
            table = _load_table(path, rel, problems)
            if table is None:
                continue
            if table.name in tables:
                problems.append(
                    MappingProblem(
                        rel,
                        "/table",
                        f"table {table.name!r} is also defined in {tables[table.name].file}",
                        line_of(table.lines, "/table"),
                    )
                )
            tables[table.name] = table

    ident = manifest["identity"]
    identity = Identity(uuid.UUID(ident["namespace"]), ident["system"])
    constants = manifest.get("constants") or {}

    rule_files: list[tuple[str, Any, dict[str, int]]] = []
    for rel in manifest["rules"]:
        path = root / rel
        files.append(rel)
        try:
            data, lines = load_yaml(path, rel)
        except MappingConfigError as exc:
            problems += exc.problems
            continue
        file_problems = _schema_problems(data, "mapping-rules.schema.json", rel, lines)
        problems += file_problems
        if not file_problems:
            rule_files.append((rel, data, lines))

    # Identity kinds first, so $ref can point at rules defined later in the order.
    kinds: dict[str, str] = {}
    names: dict[str, str] = {}
    for rel, data, lines in rule_files:
        for i, rule in enumerate(data["rules"]):
            kind, rtype = rule["identity"]["kind"], rule["resource"]
            if kinds.get(kind, rtype) != rtype:
                problems.append(
                    MappingProblem(
                        rel,
                        f"/rules/{i}/identity/kind",
                        f"kind {kind!r} already makes {kinds[kind]}",
                        line_of(lines, f"/rules/{i}/identity/kind"),
                    )
                )
            kinds[kind] = rtype
            if rule["name"] in names:
                problems.append(
                    MappingProblem(
                        rel,
                        f"/rules/{i}/name",
                        f"rule name {rule['name']!r} is also used in {names[rule['name']]}",
                        line_of(lines, f"/rules/{i}/name"),
                    )
                )
            names[rule["name"]] = rel

    rules: list[CompiledRule] = []
    for rel, data, lines in rule_files:
        for i, rule in enumerate(data["rules"]):
            rules.append(
                _compile_rule(
                    rule, f"/rules/{i}", rel, lines, tables, kinds, identity, constants, problems
                )
            )

    top_env = CompileEnv(
        "pack.yaml",
        "pack",
        manifest_lines,
        tables,
        kinds,
        identity,
        constants,
        frozenset({"submission"}),
        problems,
    )
    source_expr = compile_expr(
        ident["source"].replace("$.", "$submission.", 1)
        if ident["source"].startswith("$.")
        else ident["source"],
        "/identity/source",
        top_env,
    )
    patient_expr = None
    if "patient" in ident:
        raw = ident["patient"]
        patient_expr = compile_expr(
            raw.replace("$.", "$submission.", 1) if raw.startswith("$.") else raw,
            "/identity/patient",
            top_env,
        )
    integrity_raw = manifest.get("integrity") or {}
    integrity = Integrity(
        unique=integrity_raw.get("unique", []),
        references=integrity_raw.get("references", []),
        order=integrity_raw.get("order", []),
    )
    for i, unique_path in enumerate(integrity.unique):
        _check_integrity_path(unique_path, f"/integrity/unique/{i}", manifest_lines, problems)
    for i, ref in enumerate(integrity.references):
        for key in ("from", "to"):
            _check_integrity_path(
                ref[key], f"/integrity/references/{i}/{key}", manifest_lines, problems
            )
    for i, order in enumerate(integrity.order):
        _check_integrity_path(order["each"], f"/integrity/order/{i}/each", manifest_lines, problems)

    if problems:
        # Templates compile twice (plain and traced): report each problem once.
        unique = list({str(p): p for p in problems}.values())
        raise MappingConfigError(unique)
    fixtures = manifest.get("fixtures")
    return MappingPack(
        name=manifest["name"],
        version=str(manifest["version"]),
        directory=root,
        source_schema=source_schema,
        source_schema_file=source_schema_file,
        identity=identity,
        source_expr=source_expr,
        patient_expr=patient_expr,
        tables=tables,
        rules=rules,
        integrity=integrity,
        constants=constants,
        fixtures_dir=(root / fixtures) if fixtures else None,
        files=files,
        rule_sources=[RuleSource(rel, data, lines) for rel, data, lines in rule_files],
        manifest_lines=manifest_lines,
        code_systems=list(manifest.get("code_systems", [])),
        identity_source_path=ident["source"].removeprefix("$.").removeprefix("$submission."),
        identity_patient_path=ident.get("patient", "")
        .removeprefix("$.")
        .removeprefix("$submission."),
    )


def _check_integrity_path(
    path: str, pointer: str, lines: dict[str, int], problems: list[MappingProblem]
) -> None:
    if parse_path("$." + path) is None:
        problems.append(
            MappingProblem(
                "pack.yaml", pointer, f"not a valid path: {path!r}", line_of(lines, pointer)
            )
        )


_ACCEPTED_SCHEMAS: set[str] = set()  # canonical JSON of the source schemas check_schema passed
_MAX_ACCEPTED_SCHEMAS = 32


def check_source_schema(schema: Any) -> None:
    """jsonschema's Draft 2020-12 `check_schema` (raises SchemaError), once per distinct schema.

    It costs ~50 ms for the pack's schema, and every start needs it twice for the same schema:
    load_pack, then SubmissionValidator (issue 6). A schema it accepted is remembered by its
    canonical JSON, so an equal schema passes at once; a rejected one is checked every time.
    """
    try:
        key = json.dumps(schema, sort_keys=True, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):  # not JSON: nothing to remember it by
        key = None
    if key is not None and key in _ACCEPTED_SCHEMAS:
        return
    jsonschema.Draft202012Validator.check_schema(schema)
    if key is not None:
        if len(_ACCEPTED_SCHEMAS) >= _MAX_ACCEPTED_SCHEMAS:
            _ACCEPTED_SCHEMAS.clear()
        _ACCEPTED_SCHEMAS.add(key)


def _load_source_schema(root: Path, rel: str, problems: list[MappingProblem]) -> dict[str, Any]:
    path = root / rel
    try:
        schema = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        problems.append(MappingProblem(rel, "", f"cannot read source schema: {exc.strerror}"))
        return {}
    except json.JSONDecodeError as exc:
        problems.append(MappingProblem(rel, "", f"malformed JSON: {exc.msg}", exc.lineno))
        return {}
    try:
        check_source_schema(schema)
    except jsonschema.SchemaError as exc:
        pointer = "".join(f"/{escape_pointer_token(p)}" for p in exc.absolute_path)
        problems.append(MappingProblem(rel, pointer, f"not a valid JSON Schema: {exc.message}"))
    if not isinstance(schema, dict):
        return {}
    return schema


def _load_table(path: Path, rel: str, problems: list[MappingProblem]) -> Table | None:
    try:
        data, lines = load_yaml(path, rel)
    except MappingConfigError as exc:
        problems += exc.problems
        return None
    file_problems = _schema_problems(data, "mapping-table.schema.json", rel, lines)
    problems += file_problems
    if file_problems:
        return None
    return Table(
        name=data["table"],
        file=rel,
        rows={str(k): v for k, v in data["rows"].items()},
        lines=lines,
        description=data.get("description", ""),
        source_system=data.get("source_system"),
        target_system=data.get("target_system"),
    )


def _compile_rule(
    rule: dict[str, Any],
    pointer: str,
    file: str,
    lines: dict[str, int],
    tables: dict[str, Table],
    kinds: dict[str, str],
    identity: Identity,
    constants: dict[str, Any],
    problems: list[MappingProblem],
) -> CompiledRule:
    alias = rule.get("as")
    variables = BUILTIN_VARIABLES | ({alias} if alias else set())
    env = CompileEnv(
        file,
        rule["name"],
        lines,
        tables,
        kinds,
        identity,
        constants,
        frozenset(variables),
        problems,
    )

    for_each = None
    if "for_each" in rule:
        parsed = parse_path(rule["for_each"])
        if parsed is None or (parsed[0] not in ("", "submission")):
            env.problem(
                f"{pointer}/for_each",
                "for_each must be a path on the submission "
                "such as $.sessions or $.sessions[*].readings",
            )
        else:
            for_each = ("", parsed[1])

    when = compile_expr(rule["when"], f"{pointer}/when", env) if "when" in rule else None
    lets: list[tuple[str, Fn]] = []
    for name, expr in (rule.get("let") or {}).items():
        lets.append((name, compile_expr(expr, f"{pointer}/let/{escape_pointer_token(name)}", env)))
        env = env.with_vars(name)

    raw_key = rule["identity"]["key"]
    keys = raw_key if isinstance(raw_key, list) else [raw_key]
    key_fns = [compile_expr(k, f"{pointer}/identity/key", env) for k in keys]

    template = rule["template"]
    if "identifier" in template and identifier_cardinality(rule["resource"]) != "many":
        env.problem(
            f"{pointer}/template/identifier",
            f"{rule['resource']}.identifier holds only the engine's identity identifier "
            "in R4 (0..1 or absent)",
        )
    for reserved in ("resourceType", "id"):
        if reserved in template:
            env.problem(
                f"{pointer}/template/{reserved}",
                f"`{reserved}` is set by the engine from `resource` and `identity`",
            )
    return CompiledRule(
        name=rule["name"],
        file=file,
        pointer=pointer,
        line=line_of(lines, pointer),
        resource_line=line_of(lines, f"{pointer}/resource"),
        identity_line=line_of(lines, f"{pointer}/identity"),
        resource=rule["resource"],
        kind=rule["identity"]["kind"],
        for_each=for_each,
        alias=alias,
        when=when,
        lets=lets,
        key=key_fns,
        template=compile_template(template, f"{pointer}/template", env, traced=False),
        template_traced=compile_template(template, f"{pointer}/template", env, traced=True),
    )
