"""Structural facts of FHIR R4 (4.0.1) that the mapping engine needs, kept as plain data."""

from __future__ import annotations

# R4 (4.0.1) resources whose `identifier` is not 0..*: 0..1, or absent altogether.
_SINGLE_IDENTIFIER = frozenset(
    {
        "AdverseEvent",
        "Bundle",
        "Composition",
        "ConceptMap",
        "QuestionnaireResponse",
        "SpecimenDefinition",
        "TestReport",
        "TestScript",
    }
)
_NO_IDENTIFIER = frozenset(
    {
        "AuditEvent",
        "Binary",
        "CapabilityStatement",
        "Linkage",
        "OperationOutcome",
        "Parameters",
        "Provenance",
        "Subscription",
    }
)


def identifier_cardinality(resource_type: str) -> str | None:
    """'many', 'one' or None: where the engine puts the identity identifier."""
    if resource_type in _NO_IDENTIFIER:
        return None
    return "one" if resource_type in _SINGLE_IDENTIFIER else "many"
