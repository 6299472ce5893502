"""Sync targets file: ${VAR} substitution, validation, profile defaults, errors with file:line."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from fhirbridge.ehr.auth import parse_auth_config
from fhirbridge.sync.targets import (
    NOTE_BY_DEFAULT,
    PRODUCED_TYPES,
    Target,
    TargetConfigError,
    load_targets,
    substitute,
)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "docs" / "targets.example.yaml"
SECRET = "s3cr3t-VALUE-never-shown"


def write(tmp_path: Path, text: str, name: str = "targets.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def problems(path: Path, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(TargetConfigError) as info:
        load_targets(path, environ or {})
    text = str(info.value)
    assert SECRET not in text
    return [str(p) for p in info.value.problems]


MINIMAL = """
targets:
  - name: hapi
    base_url: https://hapi.example.org/fhir/
    profile: generic-r4
"""


# --------------------------------------------------------------------------- substitution


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("${A}", "alpha"),
        ("x-${A}-y", "x-alpha-y"),
        ("${MISSING:-dflt}", "dflt"),
        ("${EMPTY:-dflt}", "dflt"),  # POSIX :- also replaces an empty value
        ("${EMPTY}", ""),
        ("${A:-dflt}", "alpha"),
        ("${MISSING:-}", ""),
        ("$${A}", "${A}"),  # escaped
        ("cost $5 and ${A}", "cost $5 and alpha"),
        ("${A}${A}", "alphaalpha"),
    ],
)
def test_substitute(text, expected):
    assert substitute(text, {"A": "alpha", "EMPTY": ""}) == expected


def test_substitute_unset_names_variable():
    with pytest.raises(KeyError) as info:
        substitute("${NOPE}", {})
    assert info.value.args == ("NOPE",)


@pytest.mark.parametrize("text", ["${}", "${1A}", "${A-B}", "${A", "x ${ A }"])
def test_substitute_malformed(text):
    with pytest.raises(ValueError, match="malformed"):
        substitute(text, {"A": "x"})


# --------------------------------------------------------------------------- loading


def test_minimal_target_and_defaults(tmp_path):
    [target] = load_targets(write(tmp_path, MINIMAL), {})
    assert target.name == "hapi"
    assert target.base_url == "https://hapi.example.org/fhir"  # trailing slash dropped
    assert target.auth == {"type": "none"}
    assert target.resource_types == PRODUCED_TYPES
    assert "Bundle" not in target.resource_types
    assert target.create_patient is True
    assert target.patient_identifier is None
    assert (target.timeout, target.max_attempts, target.batch_size) == (30.0, 8, 100)
    assert target.ca_bundle is None


def test_environment_values_are_substituted_in_strings_only(tmp_path):
    path = write(
        tmp_path,
        """
        targets:
          - name: ${NAME}
            base_url: ${URL:-https://default.example.org/r4}
            profile: generic-r4
            auth: {type: bearer, token: "${TOKEN}"}
            timeout: ${TIMEOUT:-12.5}
            max_attempts: 3
        """,
    )
    [target] = load_targets(path, {"NAME": "lab-store", "TOKEN": SECRET})
    assert target.name == "lab-store"
    assert target.base_url == "https://default.example.org/r4"
    assert target.auth == {"type": "bearer", "token": SECRET}
    assert target.timeout == 12.5
    assert target.max_attempts == 3
    assert SECRET not in repr(target)
    assert SECRET not in str(target.summary())
    assert target.summary()["auth"] == {"type": "bearer"}


def test_unset_variable_names_variable_file_line_and_target(tmp_path):
    path = write(
        tmp_path,
        """
        targets:
          - name: epic-prod
            base_url: https://epic.example.org/r4
            profile: epic
            patient_identifier: {system: "urn:oid:1.2.3"}
            auth:
              type: bearer
              token: ${EPIC_TOKEN}
        """,
    )
    [message] = problems(path, {"OTHER": SECRET})
    assert message == (f"{path}:8: target epic-prod: environment variable EPIC_TOKEN is not set")


def test_malformed_reference_is_reported_with_line(tmp_path):
    path = write(
        tmp_path,
        """
        targets:
          - name: t1
            base_url: https://x.example.org/${BROKEN
            profile: generic-r4
        """,
    )
    [message] = problems(path)
    assert message.startswith(f"{path}:3: target t1: malformed")


def test_validation_errors_name_file_line_target_but_no_value(tmp_path):
    path = write(
        tmp_path,
        """
        targets:
          - name: good
            base_url: https://a.example.org/r4
            profile: generic-r4
          - name: Bad_Name
            base_url: ftp://b.example.org/r4
            profile: cerner
            timeout: ${T}
            colour: blue
        """,
    )
    found = problems(path, {"T": SECRET})
    joined = "\n".join(found)
    assert f"{path}:5: target Bad_Name: name: must be a slug" in joined
    assert f"{path}:6: target Bad_Name: base_url: must be an http(s) URL" in joined
    assert f"{path}:7: target Bad_Name: profile:" in joined
    assert f"{path}:8: target Bad_Name: timeout:" in joined
    assert f"{path}:9: target Bad_Name: colour: Extra inputs are not permitted" in joined
    assert "target good" not in joined


@pytest.mark.parametrize(
    ("snippet", "expected"),
    [
        ("base_url: https://user:pw@x.example.org/r4", "must not carry credentials"),
        ("base_url: https://x.example.org/r4?a=1", "must not have a query"),
        ("resource_types: [Observation, Observatoin]", "does not produce Observatoin"),
        ("resource_types: []", "at least one resource type"),
        ("resource_types: [Observation, Observation]", "twice"),
        ("fallbacks: {Patient: note}", "Patient cannot become a note"),
        ("fallbacks: {Provenance: note}", "Provenance cannot become a note"),
        ("fallbacks: {AdverseEvent: keep}", "fallbacks.AdverseEvent"),
        ("fallbacks: {Consentt: skip}", "does not produce Consentt"),
        ("batch_size: 0", "batch_size"),
        ("max_attempts: 0", "max_attempts"),
        ("timeout: -1", "timeout"),
        ("auth: {token: abc}", "needs a 'type'"),
        ("patient_identifier: {system: not a uri}", "absolute URI"),
        ("patient_identifier: {system: 'urn:oid:1', source: ssn}", "patient_identifier.source"),
        ("ca_bundle: missing.pem", "ca_bundle: is not a readable file"),
        ("create_patient: false", "patient_identifier is needed"),
    ],
)
def test_invalid_fields(tmp_path, snippet, expected):
    base = (
        "targets:\n  - name: t\n    base_url: https://x.example.org/r4\n    profile: generic-r4\n"
    )
    path = write(tmp_path, base + f"    {snippet}\n")
    found = problems(path)
    assert any(expected in p for p in found), found
    assert all(p.startswith(f"{path}:") and "target t:" in p for p in found)


def test_profile_is_required(tmp_path):
    path = write(tmp_path, "targets:\n  - name: t\n    base_url: https://x.example.org\n")
    [message] = problems(path)
    assert message == f"{path}:2: target t: profile: Field required"


@pytest.mark.parametrize(
    ("profile", "identifier", "expected"),
    [
        ("generic-r4", False, True),
        ("generic-r4", True, True),
        ("auto", False, True),
        ("auto", True, False),
        ("epic", True, False),
        ("oracle-health", True, False),
    ],
)
def test_create_patient_default_depends_on_profile(profile, identifier, expected):
    data: dict[str, object] = {"name": "t", "base_url": "https://x.example.org", "profile": profile}
    if identifier:
        data["patient_identifier"] = {"system": "urn:oid:1.2.3"}
    assert Target.model_validate(data).create_patient is expected


@pytest.mark.parametrize("profile", ["epic", "oracle-health"])
def test_ehr_profiles_need_patient_identifier(profile):
    with pytest.raises(ValueError, match="patient_identifier is needed"):
        Target.model_validate(
            {"name": "t", "base_url": "https://x.example.org", "profile": profile}
        )
    # ... unless patients may be created
    t = Target.model_validate(
        {
            "name": "t",
            "base_url": "https://x.example.org",
            "profile": profile,
            "create_patient": True,
        }
    )
    assert t.create_patient is True


def test_fallback_defaults_and_overrides():
    t = Target.model_validate(
        {
            "name": "t",
            "base_url": "https://x.example.org",
            "profile": "generic-r4",
            "fallbacks": {"Observation": "skip", "Practitioner": "note"},
        }
    )
    for rtype in ("AdverseEvent", "MedicationAdministration", "Encounter", "EpisodeOfCare"):
        assert rtype in NOTE_BY_DEFAULT
        assert t.fallback(rtype) == "note"
    for rtype in ("Provenance", "Medication", "Patient", "DocumentReference"):
        assert t.fallback(rtype) == "skip"
    assert t.fallback("Observation") == "skip"  # configured
    assert t.fallback("Practitioner") == "note"  # configured


def test_ca_bundle_relative_to_file_and_empty_means_none(tmp_path):
    (tmp_path / "certs").mkdir()
    (tmp_path / "certs" / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    path = write(
        tmp_path,
        """
        targets:
          - name: a
            base_url: https://a.example.org
            profile: generic-r4
            ca_bundle: certs/ca.pem
          - name: b
            base_url: https://b.example.org
            profile: generic-r4
            ca_bundle: ${CA:-}
        """,
    )
    a, b = load_targets(path, {})
    assert a.ca_bundle == tmp_path / "certs" / "ca.pem"
    assert b.ca_bundle is None


def test_duplicate_names(tmp_path):
    path = write(tmp_path, MINIMAL + MINIMAL.replace("targets:\n", ""))
    [message] = problems(path)
    assert message == f"{path}:6: target hapi: name also used by target #1"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("targets: [\n", "malformed YAML"),
        ("- a\n- b\n", "must be a mapping with a 'targets' list"),
        ("targets: {}\n", "must be a mapping with a 'targets' list"),
        ("targets: []\nextra: 1\n", ":2: unknown top-level key 'extra'"),
        ("targets:\n  - just-a-string\n", ":2: target #1: must be a mapping"),
    ],
)
def test_file_shape_errors(tmp_path, text, expected):
    path = write(tmp_path, text)
    found = problems(path)
    assert any(expected in p for p in found), found


def test_unreadable_file(tmp_path):
    found = problems(tmp_path / "nope.yaml")
    assert "cannot read file" in found[0]


def test_empty_targets_list(tmp_path):
    assert load_targets(write(tmp_path, "targets: []\n"), {}) == []


def test_targets_are_frozen(tmp_path):
    [target] = load_targets(write(tmp_path, MINIMAL), {})
    with pytest.raises(ValueError):
        target.name = "other"  # type: ignore[misc]


# --------------------------------------------------------------------------- the example


def _pem() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


EXAMPLE_ENV = {
    "RESEARCH_FHIR_TOKEN": SECRET,
    "EPIC_CLIENT_ID": "epic-client",
    "ORACLE_TENANT_ID": "ec2458f2-1e24-41c8-b71b-0e701af7583d",
    "ORACLE_CLIENT_ID": "oracle-client",
    "ORACLE_CLIENT_SECRET": SECRET,
}


def test_example_file_loads_and_its_auth_blocks_are_valid():
    env = {**EXAMPLE_ENV, "EPIC_PRIVATE_KEY": _pem()}
    research, epic, oracle = load_targets(EXAMPLE, env)
    assert [t.profile for t in (research, epic, oracle)] == ["generic-r4", "epic", "oracle-health"]
    assert research.base_url == "https://fhir.research.example.org/fhir"
    assert research.create_patient and research.patient_identifier is None
    assert epic.patient_identifier is not None and not epic.create_patient
    assert oracle.base_url.endswith("/r4/" + EXAMPLE_ENV["ORACLE_TENANT_ID"])
    assert "Practitioner" not in oracle.resource_types
    assert oracle.ca_bundle is None
    for target in (research, epic, oracle):
        parse_auth_config(target.auth)  # the auth module accepts what the example shows


def test_example_file_without_environment_lists_every_missing_variable():
    found = problems(EXAMPLE)
    missing = {p.rsplit("environment variable ", 1)[1] for p in found}
    assert missing == {
        "RESEARCH_FHIR_TOKEN is not set",
        "EPIC_CLIENT_ID is not set",
        "EPIC_PRIVATE_KEY is not set",
        "ORACLE_TENANT_ID is not set",
        "ORACLE_CLIENT_ID is not set",
        "ORACLE_CLIENT_SECRET is not set",
    }
    assert all(p.startswith(f"{EXAMPLE}:") for p in found)
