"""fhirbridge.audit: the AuditEvent builders (valid R4, PHI-free) and the recorder on SQLite."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import func, select

from fhirbridge import audit
from fhirbridge.fhir.validate import OutputValidator
from fhirbridge.store.query import parse_search
from fhirbridge.store.resources import ResourceStore, SavedResource, SaveResult
from fhirbridge.store.schema import search_index
from fhirbridge.store.search_params import REFERENCE_ROW, extract_index
from fhirbridge.sync import planner
from fhirbridge.sync.outbox import Result

T0 = datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)
PATIENT = "0b7e4d1c-8a36-4c1e-9f2b-3d5a6c7e8f01"
OBS = "2d906f3e-ac58-4e30-9b4d-5f7c8e9a0b03"
EVENT_ID = "6f1c1c2e-0c7a-4d5e-9a51-1d2f3a4b5c01"
VALIDATOR = OutputValidator()


def _valid(event: dict[str, Any]) -> dict[str, Any]:
    assert VALIDATOR.validate(event) == [], event
    return event


def _read_event(**kw: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "event_id": EVENT_ID,
        "recorded": T0,
        "subtype": "read",
        "action": "R",
        "outcome": "0",
        "client_id": "partner-ehr",
        "entities": [audit.resource_entity(audit.Ref("Patient", PATIENT, "3"))],
        "network_address": "10.0.0.7",
        "site": "https://fhir.example.org/fhir",
    }
    args.update(kw)
    return audit.rest_event(**args)


def test_read_event_is_valid_r4_with_who_what_when_outcome() -> None:
    event = _valid(_read_event())
    assert event["type"] == {
        "system": "http://terminology.hl7.org/CodeSystem/audit-event-type",
        "code": "rest",
        "display": "RESTful Operation",
    }
    assert event["subtype"] == [
        {"system": "http://hl7.org/fhir/restful-interaction", "code": "read"}
    ]
    assert (event["action"], event["outcome"]) == ("R", "0")
    assert "outcomeDesc" not in event
    # recorded and meta.lastUpdated: the same instant, milliseconds
    assert event["recorded"] == event["meta"]["lastUpdated"] == "2026-03-01T12:00:00.123+00:00"
    agent = event["agent"][0]
    assert agent["who"] == {
        "identifier": {"system": "urn:fhirbridge:client", "value": "partner-ehr"}
    }
    assert agent["requestor"] is True and agent["altId"] == "partner-ehr"
    assert agent["network"] == {"address": "10.0.0.7", "type": "2"}
    assert event["source"]["observer"] == {"display": "fhirbridge"}
    assert event["source"]["site"] == "https://fhir.example.org/fhir"
    assert event["entity"] == [{"what": {"reference": f"Patient/{PATIENT}/_history/3"}}]


def test_failure_event_says_only_the_status() -> None:
    event = _valid(
        _read_event(outcome=audit.outcome_for_status(404), entities=[], status=404, site=None)
    )
    assert (event["outcome"], event["outcomeDesc"]) == ("4", "HTTP 404")
    assert "entity" not in event and "site" not in event["source"]
    server = _valid(_read_event(outcome=audit.outcome_for_status(503), status=503))
    assert (server["outcome"], server["outcomeDesc"]) == ("8", "HTTP 503")


@pytest.mark.parametrize(
    ("status", "outcome"),
    [(200, "0"), (201, "0"), (304, "0"), (400, "4"), (403, "4"), (422, "4"), (500, "8")],
)
def test_outcome_for_status(status: int, outcome: str) -> None:
    assert audit.outcome_for_status(status) == outcome


def test_unknown_subtype_or_action_is_refused() -> None:
    with pytest.raises(ValueError):
        _read_event(subtype="delete-everything")
    with pytest.raises(ValueError):
        _read_event(action="X")
    with pytest.raises(ValueError):
        audit.audited("read", "Q")


def test_query_entity_names_parameters_never_values() -> None:
    entity = audit.query_entity(
        "Patient", ["identifier", "_count", "identifier"], returned=2, total=7
    )
    event = _valid(_read_event(subtype="search-type", action="E", entities=[entity]))
    assert event["entity"][0] == {
        "type": {"system": "http://hl7.org/fhir/resource-types", "code": "Patient"},
        "role": {
            "system": "http://terminology.hl7.org/CodeSystem/object-role",
            "code": "24",
            "display": "Query",
        },
        "detail": [
            {"type": "parameters", "valueString": "_count,identifier"},
            {"type": "total", "valueString": "7"},
            {"type": "returned", "valueString": "2"},
        ],
    }
    # no parameters at all: no empty detail (FHIR forbids empty strings)
    bare = audit.query_entity(None, [], returned=0)
    assert bare["detail"] == [{"type": "returned", "valueString": "0"}]
    _valid(_read_event(subtype="search-type", action="E", entities=[bare]))


def _saved(*outcomes: str) -> SaveResult:
    resources = tuple(
        SavedResource("Observation", f"obs-{n}", "1" if o == "created" else "2", o)  # type: ignore[arg-type]
        for n, o in enumerate(outcomes)
    )
    return SaveResult(created=True, submission_id="sub-1", resources=resources)


@pytest.mark.parametrize(
    ("outcomes", "subtype", "action"),
    [
        (("created", "unchanged"), "create", "C"),
        (("updated", "unchanged"), "update", "U"),
        (("unchanged", "unchanged"), "update", "U"),
    ],
)
def test_submission_event(outcomes: tuple[str, ...], subtype: str, action: str) -> None:
    event = _valid(
        audit.submission_event(
            event_id=EVENT_ID, recorded=T0, client_id="clinic-a-etl", saved=_saved(*outcomes)
        )
    )
    assert (event["subtype"][0]["code"], event["action"], event["outcome"]) == (
        subtype,
        action,
        "0",
    )
    submission, *resources = event["entity"]
    assert submission["what"] == {
        "identifier": {"system": "urn:fhirbridge:submission", "value": "sub-1"}
    }
    assert submission["detail"] == [{"type": "resources", "valueString": str(len(outcomes))}]
    assert [e["what"]["reference"] for e in resources] == [
        f"Observation/obs-{n}/_history/{'1' if o == 'created' else '2'}"
        for n, o in enumerate(outcomes)
    ]


def test_entities_are_capped_and_counted() -> None:
    saved = _saved(*(["created"] * 250))
    event = _valid(
        audit.submission_event(event_id=EVENT_ID, recorded=T0, client_id="c", saved=saved)
    )
    assert len(event["entity"]) == 1 + audit.MAX_ENTITIES
    assert event["entity"][0]["detail"] == [{"type": "resources", "valueString": "250"}]


def _delivered(*statuses: str) -> list[audit.Delivered]:
    return [audit.Delivered("Observation", f"obs-{n}", "2", s) for n, s in enumerate(statuses)]


@pytest.mark.parametrize(
    ("statuses", "outcome"),
    [
        (("sent", "sent"), "0"),
        (("sent", "fallback", "skipped", "waiting"), "0"),
        (("sent", "dead"), "4"),  # the target refused one for good
        (("sent", "retrying"), "8"),  # the target or the network failed
        (("dead", "retrying"), "8"),
    ],
)
def test_delivery_event_outcome_is_the_worst_of_the_request(
    statuses: tuple[str, ...], outcome: str
) -> None:
    event = _valid(
        audit.delivery_audit_event(
            event_id=EVENT_ID,
            recorded=T0,
            target="hospital-a",
            interaction="transaction",
            delivered=_delivered(*statuses),
        )
    )
    assert event["outcome"] == outcome
    assert event["action"] == "E"
    assert event["agent"][0]["who"]["identifier"]["value"] == audit.SYNC_CLIENT_ID
    assert event["entity"][1] == {
        "what": {"reference": "Observation/obs-1/_history/2"},
        "detail": [
            {"type": "target", "valueString": "hospital-a"},
            {"type": "status", "valueString": statuses[1]},
        ],
    }


@pytest.mark.parametrize(("interaction", "action"), [("create", "C"), ("update", "U")])
def test_delivery_event_action(interaction: str, action: str) -> None:
    event = audit.delivery_audit_event(
        event_id=EVENT_ID,
        recorded=T0,
        target="t",
        interaction=interaction,
        delivered=_delivered("sent"),
    )
    assert (event["subtype"][0]["code"], event["action"]) == (interaction, action)


def test_delivery_interaction_of_each_step_kind() -> None:
    key = f"Observation/{OBS}"
    single_put = planner.Single(key=key, method="PUT", url=key, body={})
    single_post = planner.Single(key=key, method="POST", url="Observation", body={})
    entry = planner.Entry(key=key, method="PUT", url=key, resource={}, full_url="urn:uuid:x")
    cases: list[tuple[planner.Step, str | None]] = [
        (planner.Transaction(entries=(entry,)), "transaction"),
        (planner.Batch(entries=(entry,)), "batch"),
        (single_put, "update"),
        (single_post, "create"),
        (planner.Update(key=key, url="Observation/9", body={}), "update"),
        (
            planner.SearchThenCreate(key=key, type="Observation", identifier="s|v", body={}),
            "create",
        ),
        (planner.MatchPatient(key=key, system="s", value="v"), "search-type"),
        (planner.Wait(key=key, reason="no encounter"), None),
        (planner.Fallback(key=key, action="skip", reason="unsupported"), None),
        (planner.Fallback(key=key, action="note", reason="r", write=single_post), "create"),
    ]
    for step, interaction in cases:
        assert audit.delivery_interaction(step) == interaction, step


def test_search_rows_of_an_event() -> None:
    entity = audit.query_entity("Observation", ["code"], returned=1, total=1)
    event = _read_event(
        subtype="search-type",
        action="E",
        entities=[entity, audit.resource_entity(audit.Ref("Observation", OBS, "2"))],
    )
    rows = {(r.param, r.system, r.value, r.ref) for r in extract_index(event) if r.param != "date"}
    assert rows >= {
        ("altid", None, "partner-ehr", None),
        ("entity", None, OBS, f"Observation/{OBS}"),
        ("outcome", None, "0", None),
        ("action", None, "E", None),
        ("type", "http://terminology.hl7.org/CodeSystem/audit-event-type", "rest", None),
        ("subtype", "http://hl7.org/fhir/restful-interaction", "search-type", None),
    }
    assert [r.param for r in extract_index(event)].count("date") == 1


# ---------------------------------------------------------------- the recorder, on SQLite


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ResourceStore]:
    s = ResourceStore.from_url(f"sqlite:///{tmp_path / 'audit.db'}")
    s.create_schema()
    yield s
    s.close()


def test_recorded_events_are_read_searched_and_versioned_like_any_resource(
    store: ResourceStore,
) -> None:
    first = _read_event()
    second = _read_event(event_id="7a2d2d3f-1d8b-4e6f-8b62-2e3f4b5c6d02", outcome="4", status=404)
    audit.record(store, [first, second])
    assert store.read("AuditEvent", EVENT_ID) == first
    assert [v.version_id for v in store.history_stored("AuditEvent", EVENT_ID)] == ["1"]

    def found(*criteria: tuple[str, str]) -> set[str]:
        page = store.search("AuditEvent", parse_search("AuditEvent", list(criteria)))
        return {e.id for e in page.entries}

    assert found(("entity", f"Patient/{PATIENT}")) == {EVENT_ID, second["id"]}
    assert found(("outcome", "4")) == {second["id"]}
    assert found(("altid", "urn:fhirbridge:client|partner-ehr")) == set()  # altId has no system
    assert found(("altid", "partner-ehr"), ("action", "R")) == {EVENT_ID, second["id"]}
    assert found(("date", "2026-03-01")) == {EVENT_ID, second["id"]}
    assert found(("date", "lt2026-03-01T12:00:00Z")) == set()
    assert found(("subtype", "http://hl7.org/fhir/restful-interaction|read")) == {
        EVENT_ID,
        second["id"],
    }
    with store.engine.connect() as conn:
        refs = conn.execute(
            select(func.count()).where(search_index.c.param == REFERENCE_ROW)
        ).scalar_one()
    assert refs == 0  # no "~ref" rows: AuditEvents never take part in $everything


def test_events_are_not_in_the_patient_compartment(store: ResourceStore) -> None:
    patient = {"resourceType": "Patient", "id": PATIENT, "gender": "female"}
    store.save_submission(
        submission_id="s1",
        source="t",
        patient_id=PATIENT,
        content_hash="h1",
        resources=[patient],
        summary={},
        now=T0,
    )
    audit.record(store, [_read_event()])
    everything = store.everything(PATIENT)
    assert [r["resourceType"] for r in everything] == ["Patient"]


def test_an_event_written_in_a_failed_transaction_is_not_kept(store: ResourceStore) -> None:
    with pytest.raises(RuntimeError), store.write() as conn:
        audit.insert_events(conn, [_read_event()])
        raise RuntimeError("the submission failed")
    page = store.search("AuditEvent", parse_search("AuditEvent", []))
    assert page.total == 0


def test_stored_json_is_what_was_built(store: ResourceStore) -> None:
    event = _read_event()
    audit.record(store, [event])
    assert orjson.loads(store.read_stored("AuditEvent", EVENT_ID).json or "") == event


def test_step_audit_event_from_the_ledger_results_of_a_step() -> None:
    key = f"Observation/{OBS}"
    results = [Result(("Observation", OBS), 3, "sent"), Result(("Patient", PATIENT), 1, "dead")]
    put = planner.Single(key=key, method="PUT", url=key, body={})
    event = audit.step_audit_event(put, target="ehr", results=results, recorded=T0)
    assert event is not None
    _valid(event)
    assert (event["subtype"][0]["code"], event["action"], event["outcome"]) == ("update", "U", "4")
    assert [e["what"]["reference"] for e in event["entity"]] == [
        f"Observation/{OBS}/_history/3",
        f"Patient/{PATIENT}/_history/1",
    ]
    wait = planner.Wait(key=key, reason="no encounter")
    assert audit.step_audit_event(wait, target="ehr", results=results, recorded=T0) is None
    assert audit.step_audit_event(put, target="ehr", results=[], recorded=T0) is None
