"""The planner's shortcut (`_resolve_unchanged`: no walk of a resource whose references all stay
as they are) plans exactly what the full walk plans, on every profile and ledger state."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from fhirbridge.sync import planner
from fhirbridge.sync.capabilities import load_profile
from fhirbridge.sync.targets import PatientIdentifier, Target
from tests.integration.sync_support import mapped


def _due(resources: list[dict[str, Any]], sent: set[str]) -> list[planner.Due]:
    out = []
    for r in resources:
        key = f"{r['resourceType']}/{r['id']}"
        ledger = planner.Ledger(
            server_id=f"srv-{r['id'][:8]}" if key in sent else None,
            server_version="1" if key in sent else None,
            sent_version="1" if key in sent else None,
            state="in_flight",
        )
        out.append(planner.Due(r, "2" if key in sent else "1", ledger))
    return out


def _plans(monkeypatch: pytest.MonkeyPatch, **kwargs: Any) -> tuple[Any, Any, int]:
    """(the plan, the plan without the shortcut, how often the shortcut was taken)."""
    shortcut = planner._resolve_unchanged
    taken = 0

    def counted(ctx: Any, item: Any) -> bool:
        nonlocal taken
        done = shortcut(ctx, item)
        taken += done
        return done

    with monkeypatch.context() as m:
        m.setattr(planner, "_resolve_unchanged", counted)
        fast = planner.plan(**kwargs).to_dict()
        m.setattr(planner, "_resolve_unchanged", lambda ctx, item: False)
        slow = planner.plan(**kwargs).to_dict()
    return fast, slow, taken


@pytest.mark.parametrize("profile", ["generic-r4", "epic", "oracle-health"])
@pytest.mark.parametrize("variant", ["new", "some sent", "shared sent", "no transactions"])
def test_the_shortcut_plans_what_the_walk_plans(
    monkeypatch: pytest.MonkeyPatch, profile: str, variant: str
) -> None:
    resources = list(mapped(2)[1].resources)  # the second patient: shared records too
    caps = load_profile(profile)
    if variant == "no transactions":
        caps = dataclasses.replace(caps, transaction=False, batch=False)
    keys = [f"{r['resourceType']}/{r['id']}" for r in resources]
    shared = {k for k in keys if k.split("/")[0] in ("Practitioner", "Medication")}
    sent = set(keys[::3]) if variant == "some sent" else set()
    due = _due([r for r in resources if f"{r['resourceType']}/{r['id']}" not in shared], sent)
    server_refs = {k: f"{k.split('/')[0]}/srv-{k.split('/')[1][:8]}" for k in sent}
    if variant == "shared sent":
        server_refs |= {k: k for k in shared}  # PUT to our id earlier
    elif variant != "some sent":
        due += _due([r for r in resources if f"{r['resourceType']}/{r['id']}" in shared], set())
    patient_key = next(k for k in keys if k.startswith("Patient/"))
    target = Target(
        name="ehr",
        base_url="http://ehr.test/fhir",
        profile=profile,
        patient_identifier=(
            PatientIdentifier(system="urn:oid:1.2.3") if profile != "generic-r4" else None
        ),
    )
    encounters = {k: f"Encounter/hosp-{k[10:18]}" for k in keys if k.startswith("Encounter/")}
    fast, slow, taken = _plans(
        monkeypatch,
        target=target,
        caps=caps,
        due=due,
        server_refs=server_refs,
        patient_ref="Patient/hosp-1" if profile != "generic-r4" else server_refs.get(patient_key),
        encounter_refs=encounters if caps.requires_existing_encounter else {},
    )
    assert fast == slow
    if profile == "generic-r4" and variant != "some sent":  # PUT to our ids: the shortcut
        assert taken >= len(due) // 2
