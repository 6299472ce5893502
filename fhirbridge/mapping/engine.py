"""Apply a compiled pack to one submission: pure, deterministic, no I/O (clock passed in)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson

from fhirbridge.errors import Issue, OutputInvalidError
from fhirbridge.mapping.expr import Ctx, Origin, Unmapped, truthy, walk_with_paths
from fhirbridge.mapping.pack import CompiledRule, MappingPack
from fhirbridge.mapping.r4 import identifier_cardinality


@dataclass(slots=True)
class Produced:
    """One output resource with the source record it came from and the rule that made it."""

    resource: dict[str, Any]
    rule: str
    record_path: str
    record_id: Any


@dataclass
class MapResult:
    """What mapping one submission gives: resources in dependency order, and what was left.

    `produced` holds each resource once; `links` holds every (record → resource) pair, so a
    Medication shared by two doses is one resource linked from both dose records.
    """

    submission_id: str
    content_hash: str
    source: str
    patient_id: str | None
    produced: list[Produced]
    links: list[Produced]
    unmapped: list[Unmapped] = field(default_factory=list)
    trace: dict[str, list[dict[str, Any]]] | None = None

    @property
    def resources(self) -> list[dict[str, Any]]:
        return [p.resource for p in self.produced]

    def records(self) -> list[dict[str, Any]]:
        """Per source record, the resources it produced (the submission summary)."""
        by_record: dict[str, dict[str, Any]] = {}
        for p in self.links:
            entry = by_record.get(p.record_path)
            if entry is None:
                entry = {"record": p.record_path, "produced": []}
                if p.record_id is not None:
                    entry["sourceId"] = p.record_id
                by_record[p.record_path] = entry
            ref = {"resourceType": p.resource["resourceType"], "id": p.resource["id"]}
            if ref not in entry["produced"]:
                entry["produced"].append(ref)
        return list(by_record.values())


def content_hash(submission: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON (sorted keys): the same document always hashes the same."""
    return hashlib.sha256(orjson.dumps(submission, option=orjson.OPT_SORT_KEYS)).hexdigest()


def map_submission(
    pack: MappingPack,
    submission: dict[str, Any],
    *,
    now: datetime,
    trace: bool = False,
) -> MapResult:
    """Map a schema-valid submission to FHIR resources. `now` stamps Provenance.recorded."""
    digest = content_hash(submission)
    base_vars: dict[str, Any] = {
        "submission": submission,
        "now": now.isoformat(timespec="milliseconds"),
    }
    probe = Ctx(vars=base_vars)
    source = pack.source_expr(probe)
    base_vars["source"] = source
    base_vars["submission_hash"] = digest
    patient_id = pack.patient_expr(probe) if pack.patient_expr else None
    source_text = str(source)
    identity = pack.identity
    submission_id = identity.resource_id(source_text, "submission", digest)

    ctx = Ctx(vars=dict(base_vars))
    produced: list[Produced] = []
    links: list[Produced] = []
    seen: dict[tuple[str, str], int] = {}
    traces: dict[str, list[dict[str, Any]]] | None = {} if trace else None

    for rule in pack.rules:
        system: str | None = None  # the rule's identifier system, made once per run
        cardinality = identifier_cardinality(rule.resource)
        for item, path in _items(rule, submission):
            ctx.vars = dict(base_vars)
            ctx.vars[""] = item
            if rule.alias:
                ctx.vars[rule.alias] = item
            for name, fn in rule.lets:
                ctx.vars[name] = fn(ctx)
            if rule.when is not None and not truthy(rule.when(ctx)):
                continue
            key = _key(rule, ctx)
            rid = identity.run_resource_id(ctx, source_text, rule.kind, key)
            ctx.vars["id"] = rid
            if traces is not None:
                body, body_trace = rule.template_traced(ctx)
            else:
                body, body_trace = rule.template(ctx), None
            if system is None:
                system = identity.system(source_text, rule.kind)
            resource = _assemble(rule.resource, cardinality, rid, system, key, body)
            ident = (rule.resource, rid)
            if ident in seen:
                earlier = produced[seen[ident]]
                if earlier.resource != resource:
                    raise OutputInvalidError(
                        "two source records map to one resource with different content",
                        [
                            Issue(
                                f"rule {rule.name!r} made {rule.resource} {rid} from {path} "
                                f"differently than from {earlier.record_path}",
                                (path, earlier.record_path),
                                code="duplicate",
                            )
                        ],
                    )
                links.append(Produced(earlier.resource, rule.name, path, _record_id(item)))
                continue
            seen[ident] = len(produced)
            made = Produced(resource, rule.name, path, _record_id(item))
            produced.append(made)
            links.append(made)
            ctx.produced.append(ident)
            if traces is not None:
                traces[f"{rule.resource}/{rid}"] = _flatten_trace(rule, resource, body_trace)

    return MapResult(
        submission_id=submission_id,
        content_hash=digest,
        source=str(source),
        patient_id=str(patient_id) if patient_id is not None else None,
        produced=produced,
        links=links,
        unmapped=ctx.unmapped,
        trace=traces,
    )


def _items(rule: CompiledRule, submission: dict[str, Any]) -> list[tuple[Any, str]]:
    if rule.for_each is None:
        return [(submission, "$")]
    _, steps = rule.for_each
    return [
        (item, f"$.{path}" if path else "$")
        for item, path in walk_with_paths(submission, steps, "")
    ]


def _record_id(item: Any) -> Any:
    return item.get("id") if isinstance(item, dict) else None


def _key(rule: CompiledRule, ctx: Ctx) -> str:
    if len(rule.key) == 1:
        value = rule.key[0](ctx)
        key = "" if value is None else str(value)
    else:
        key = "|".join(
            "" if value is None else str(value) for value in (fn(ctx) for fn in rule.key)
        )
    if not key.strip("|"):
        raise OutputInvalidError(
            "a record has no identity key",
            [Issue(f"rule {rule.name!r}: identity key is empty", code="required")],
        )
    return key


def _assemble(
    resource_type: str,
    cardinality: str | None,
    rid: str,
    system: str,
    key: str,
    body: dict[str, Any] | None,
) -> dict[str, Any]:
    """resourceType, id, meta first; the engine's own identifier leads the identifier list.

    `cardinality` is :func:`identifier_cardinality` of `resource_type`.
    """
    body = body or {}
    resource: dict[str, Any] = {"resourceType": resource_type, "id": rid}
    if "meta" in body:
        resource["meta"] = body["meta"]
    own = {"system": system, "value": key}
    if cardinality == "many":
        extra = body.get("identifier")
        resource["identifier"] = [own, *(extra if isinstance(extra, list) else [])]
    elif cardinality == "one":
        resource["identifier"] = own
    for k, v in body.items():
        if k not in ("meta", "identifier"):
            resource[k] = v
    return resource


def _flatten_trace(
    rule: CompiledRule, resource: dict[str, Any], body_trace: Any
) -> list[dict[str, Any]]:
    """Every leaf element of the resource → the rule line that produced it."""
    rule_origin = Origin(rule.file, rule.line, rule.name, rule.pointer)
    identity_origin = Origin(rule.file, rule.identity_line, rule.name, f"{rule.pointer}/identity")
    out: list[dict[str, Any]] = []
    rtype = resource["resourceType"]

    def emit(path: str, origin: Origin) -> None:
        out.append({"path": path, **origin.to_dict()})

    def walk(value: Any, trace: Any, path: str) -> None:
        if isinstance(trace, Origin):
            # An expression produced this whole subtree: report each leaf under it.
            for leaf in _leaves(value, path):
                emit(leaf, trace)
        elif isinstance(value, dict) and isinstance(trace, dict):
            for key, sub in value.items():
                walk(sub, trace.get(key), f"{path}.{key}")
        elif isinstance(value, list) and isinstance(trace, list):
            for i, sub in enumerate(value):
                walk(sub, trace[i] if i < len(trace) else None, f"{path}[{i}]")
        else:
            for leaf in _leaves(value, path):
                emit(leaf, rule_origin)

    emit(
        f"{rtype}.resourceType",
        Origin(rule.file, rule.resource_line, rule.name, f"{rule.pointer}/resource"),
    )
    emit(f"{rtype}.id", identity_origin)
    body_trace = body_trace if isinstance(body_trace, dict) else {}
    for key, value in resource.items():
        if key in ("resourceType", "id"):
            continue
        if key == "identifier" and isinstance(value, dict):
            for leaf in _leaves(value, f"{rtype}.identifier"):
                emit(leaf, identity_origin)
            continue
        if key == "identifier":
            for leaf in _leaves(value[0], f"{rtype}.identifier[0]"):
                emit(leaf, identity_origin)
            sub_trace = body_trace.get("identifier")
            for i, sub in enumerate(value[1:], start=1):
                t = (
                    sub_trace[i - 1]
                    if isinstance(sub_trace, list) and i - 1 < len(sub_trace)
                    else None
                )
                walk(sub, t, f"{rtype}.identifier[{i}]")
            continue
        walk(value, body_trace.get(key), f"{rtype}.{key}")
    return out


def _leaves(value: Any, path: str) -> list[str]:
    if isinstance(value, dict):
        return [leaf for k, v in value.items() for leaf in _leaves(v, f"{path}.{k}")]
    if isinstance(value, list):
        return [leaf for i, v in enumerate(value) for leaf in _leaves(v, f"{path}[{i}]")]
    return [path]
