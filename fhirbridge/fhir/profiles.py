"""The FHIR R4 (4.0.1) vital-signs profile rules, checked on Observations that are vital signs.

Pure: takes a parsed resource, returns :class:`fhirbridge.errors.Issue` objects with
FHIRPath-style locations (``Observation.component[1].valueQuantity.code``). Messages name the
rule, the profile and the expected code or unit; they never contain an instance value.

Sources (read for this module, R4 = FHIR 4.0.1):
  * the StructureDefinitions ``StructureDefinition-{vitalsigns,heartrate,resprate,bodytemp,
    oxygensat,bp,bodyheight,bodyweight,bmi,headcircum,vitalspanel}.json`` and the ValueSets
    ``ValueSet-{observation-vitalsignresult,ucum-vitals-common,ucum-bodytemp,ucum-bodylength,
    ucum-bodyweight}.json`` of the HL7 npm package ``hl7.fhir.r4.examples@4.0.1`` (CC0-1.0;
    ``npm pack hl7.fhir.r4.examples@4.0.1``: ``hl7.fhir.r4.core@4.0.1`` is not on
    registry.npmjs.org, and the examples package carries the same canonical resources, 4.0.1);
  * the vital-signs narrative, as worded on the R4 ballot page
    http://hl7.org/fhir/2018Dec/observation-vitalsigns.html: "When a FHIR implementation
    supports any of the vital signs listed below, the implementation SHALL conform to this
    profile for the vital sign observation" (why a LOINC code alone makes the profile apply);
  * http://hl7.org/fhir/R4/oxygensat.html (2708-6 fixed; "Other additional Codings are
    allowed ... e.g. more specific LOINC Codes").

Which Observations are checked: those that claim to be vital signs by any of
  * a category coding ``vital-signs``;
  * a ``meta.profile`` naming one of the eleven R4 vital-signs profiles (``|version`` ignored);
  * a LOINC code from ValueSet observation-vitalsignresult, or 59408-5 (SpO2 by pulse
    oximetry, the additional code R4's oxygensat page and examples pair with 2708-6).
The specific profiles applied are those claimed in ``meta.profile`` plus those whose LOINC code
the Observation carries (the R4 "SHALL conform" rule), plus any the caller nominates.

Rules of the base profile (vitalsigns), for every vital-sign Observation:
  * ``status`` 1..1;
  * ``category`` has slice VSCat: a coding observation-category#vital-signs (1..1);
  * ``subject`` 1..1, Reference(Patient): when the reference's type can be told (``type``,
    a ``Type/id`` or absolute URL, a ``#contained`` id, or a Bundle ``fullUrl``) it is Patient;
  * ``effective[x]`` 1..1 and only dateTime or Period;
  * vs-1: an effectiveDateTime is precise to at least the day;
  * vs-2: with no component and no hasMember, value[x] or dataAbsentReason is present;
  * vs-3: every component has value[x] or dataAbsentReason;
  * ``component.value[x]`` has a *required* binding to ucum-vitals-common: a component
    valueQuantity has system http://unitsofmeasure.org and one of its codes.
Rules of the specific profiles:
  * ``code.coding`` has the profile's fixed LOINC slice (system http://loinc.org + code):
    heartrate 8867-4, resprate 9279-1, bodytemp 8310-5, oxygensat 2708-6, bp 85354-9,
    bodyheight 8302-2, bodyweight 29463-7, bmi 39156-5, headcircum 9843-4. Slicing is open, so
    other codings may be added; an SpO2 Observation coded only 59408-5 fails (2708-6 is 1..1).
    vitalspanel's 85353-1 slice is 0..* in 4.0.1, so its absence is only a *warning*.
  * value[x] is restricted to Quantity; ``valueQuantity`` (when present) has ``value``,
    ``unit``, ``system`` = http://unitsofmeasure.org and ``code``: /min (heartrate, resprate),
    Cel | [degF] (bodytemp, ucum-bodytemp), % (oxygensat), cm | [in_i] (bodyheight,
    headcircum, ucum-bodylength), kg | [lb_av] | g (bodyweight, ucum-bodyweight), kg/m2 (bmi).
  * bmi: valueQuantity 1..1.
  * bp: valueQuantity 0..0; components SystolicBP (8480-6) and DiastolicBP (8462-4), each
    1..1, whose valueQuantity (when present) has value, unit, UCUM system and code mm[Hg];
    a component without a value needs a dataAbsentReason (vs-3).
  * vitalspanel: value[x] 0..0, hasMember 1..*.
Not checked: extensible bindings (the base code binding), mustSupport, and R4 core invariants
that are not part of the profile (obs-6, obs-7).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

from fhirbridge.errors import Issue

__all__ = [
    "PROFILE_BASE",
    "VITAL_SIGNS_PROFILES",
    "applicable_profiles",
    "check_vital_signs",
    "is_vital_signs",
]

LOINC: Final = "http://loinc.org"
UCUM: Final = "http://unitsofmeasure.org"
CATEGORY_SYSTEM: Final = "http://terminology.hl7.org/CodeSystem/observation-category"
PROFILE_BASE: Final = "http://hl7.org/fhir/StructureDefinition/"

#: ValueSet observation-vitalsignresult (R4 4.0.1), all LOINC.
VITAL_SIGN_CODES: Final = frozenset(
    {
        "85353-1", "9279-1", "8867-4", "2708-6", "8310-5", "8302-2", "9843-4",
        "29463-7", "39156-5", "85354-9", "8480-6", "8462-4", "8478-0",
    }
)  # fmt: skip
SPO2_PULSE_OXIMETRY: Final = "59408-5"
SYSTOLIC: Final = "8480-6"
DIASTOLIC: Final = "8462-4"

#: ValueSet ucum-vitals-common (R4 4.0.1): the required binding of component.value[x].
UCUM_VITALS_COMMON: Final = (
    "%", "cm", "[in_i]", "kg", "g", "[lb_av]", "Cel", "[degF]", "mm[Hg]", "/min", "kg/m2", "m2",
)  # fmt: skip

_VALUE_CHOICES: Final = (
    "valueQuantity", "valueCodeableConcept", "valueString", "valueBoolean", "valueInteger",
    "valueRange", "valueRatio", "valueSampledData", "valueTime", "valueDateTime", "valuePeriod",
)  # fmt: skip
_EFFECTIVE_OTHER: Final = ("effectiveInstant", "effectiveTiming")
# vs-1 is `($this as dateTime).toString().length() >= 8`: a date with at least a day.
_DAY_PRECISION = re.compile(r"\d{4}-\d{2}-\d{2}")
# Type of a literal reference: `Patient/1`, `Patient/1/_history/2`, `https://x/fhir/Patient/1`.
_REFERENCE_TYPE = re.compile(
    r"(?:^|/)([A-Z][A-Za-z]+)/[A-Za-z0-9\-.]{1,64}(?:/_history/[A-Za-z0-9\-.]{1,64})?$"
)


@dataclass(frozen=True, slots=True)
class VitalProfile:
    """One specific R4 vital-signs profile, reduced to what its differential constrains."""

    name: str  # the last segment of its canonical URL
    title: str  # used in messages
    loinc: str  # the fixed code of its Observation.code.coding slice
    units: tuple[str, ...] = ()  # allowed valueQuantity.code; () = no valueQuantity constraint
    loinc_required: bool = True  # False: vitalspanel's code slice is 0..* in 4.0.1
    value_required: bool = False  # bmi: valueQuantity 1..1
    value_forbidden: bool = False  # bp, vitalspanel: value[x] 0..0
    components: tuple[str, ...] = ()  # bp: required component slices (LOINC)
    has_member_required: bool = False  # vitalspanel: hasMember 1..*

    @property
    def url(self) -> str:
        return PROFILE_BASE + self.name


_PROFILES: Final = (
    VitalProfile("heartrate", "heart rate", "8867-4", ("/min",)),
    VitalProfile("resprate", "respiratory rate", "9279-1", ("/min",)),
    VitalProfile("bodytemp", "body temperature", "8310-5", ("Cel", "[degF]")),
    VitalProfile("oxygensat", "oxygen saturation", "2708-6", ("%",)),
    VitalProfile("bodyheight", "body height", "8302-2", ("cm", "[in_i]")),
    VitalProfile("bodyweight", "body weight", "29463-7", ("kg", "[lb_av]", "g")),
    VitalProfile("bmi", "BMI", "39156-5", ("kg/m2",), value_required=True),
    VitalProfile("headcircum", "head circumference", "9843-4", ("cm", "[in_i]")),
    VitalProfile(
        "bp", "blood pressure", "85354-9", value_forbidden=True, components=(SYSTOLIC, DIASTOLIC)
    ),
    VitalProfile(
        "vitalspanel",
        "vital signs panel",
        "85353-1",
        loinc_required=False,
        value_forbidden=True,
        has_member_required=True,
    ),
)
_BY_NAME: Final[Mapping[str, VitalProfile]] = {p.name: p for p in _PROFILES}
_BY_CODE: Final[Mapping[str, VitalProfile]] = {
    **{p.loinc: p for p in _PROFILES},
    SPO2_PULSE_OXIMETRY: _BY_NAME["oxygensat"],
}
_COMPONENT_TITLES: Final = {
    SYSTOLIC: "systolic blood pressure",
    DIASTOLIC: "diastolic blood pressure",
}

#: Canonical URLs of the eleven R4 vital-signs profiles (the base one and the ten specific).
VITAL_SIGNS_PROFILES: Final = frozenset({PROFILE_BASE + "vitalsigns", *(p.url for p in _PROFILES)})

#: Maps a reference (``urn:uuid:…``, absolute URL) to the type of the resource it points to.
Resolver = Callable[[str], str | None]


# --------------------------------------------------------------------------------------------
# Which Observations, which profiles
# --------------------------------------------------------------------------------------------


def _dicts(value: Any) -> Iterator[dict[str, Any]]:
    """The objects of a JSON array (nothing when it is not an array): shape errors are the
    structural validator's to report, the profile rules only look at well-formed parts."""
    if isinstance(value, list):
        yield from (item for item in value if isinstance(item, dict))


def _codings(concept: Any) -> Iterator[dict[str, Any]]:
    return _dicts(concept.get("coding")) if isinstance(concept, dict) else iter(())


def _has_coding(concept: Any, system: str, code: str) -> bool:
    return any(c.get("system") == system and c.get("code") == code for c in _codings(concept))


def _loinc_codes(concept: Any) -> set[str]:
    return {
        c["code"]
        for c in _codings(concept)
        if c.get("system") == LOINC and isinstance(c.get("code"), str)
    }


def _claimed_profiles(resource: Mapping[str, Any]) -> set[str]:
    meta = resource.get("meta")
    raw = meta.get("profile") if isinstance(meta, dict) else None
    urls = raw if isinstance(raw, list) else []
    # a canonical may carry a version (`…/heartrate|4.0.1`); the profile is the same
    return {u.split("|", 1)[0] for u in urls if isinstance(u, str)} & VITAL_SIGNS_PROFILES


def is_vital_signs(resource: Any) -> bool:
    """Whether ``resource`` is an Observation that claims to be a vital sign (see module doc)."""
    if not isinstance(resource, dict) or resource.get("resourceType") != "Observation":
        return False
    if any(
        c.get("code") == "vital-signs"
        for cat in _dicts(resource.get("category"))
        for c in _codings(cat)
    ):
        return True
    if _claimed_profiles(resource):
        return True
    codes = _loinc_codes(resource.get("code"))
    return bool(codes & VITAL_SIGN_CODES) or SPO2_PULSE_OXIMETRY in codes


def applicable_profiles(resource: Mapping[str, Any], nominated: Iterable[str] = ()) -> list[str]:
    """Canonical URLs of the specific profiles that apply (claimed, by code, or nominated)."""
    names = {u.removeprefix(PROFILE_BASE) for u in _claimed_profiles(resource)}
    names |= {u.split("|", 1)[0].removeprefix(PROFILE_BASE) for u in nominated}
    names |= {_BY_CODE[c].name for c in _loinc_codes(resource.get("code")) if c in _BY_CODE}
    return [p.url for p in _PROFILES if p.name in names]


# --------------------------------------------------------------------------------------------
# Rules
# --------------------------------------------------------------------------------------------


def check_vital_signs(
    resource: Any, *, nominated: Iterable[str] = (), resolve: Resolver | None = None
) -> list[Issue]:
    """The profile issues of one resource (``[]`` when it is not a vital-sign Observation).

    ``nominated``: profile URLs the caller asks for (``$validate``'s ``profile``), applied even
    when the resource does not claim them. ``resolve``: tells the type behind a reference
    that the reference itself does not show (a Bundle's ``urn:uuid`` fullUrls).
    """
    # unknown URLs are the caller's to reject ($validate answers an error for them)
    nominated = [u for u in (n.split("|", 1)[0] for n in nominated) if u in VITAL_SIGNS_PROFILES]
    if not isinstance(resource, dict):
        return []
    if nominated and resource.get("resourceType") != "Observation":
        return [
            Issue(
                "the nominated vital-signs profile constrains Observation, not this resource type",
                ("Resource.resourceType",),
                "invalid",
            )
        ]
    if not nominated and not is_vital_signs(resource):
        return []
    specific = [
        _BY_NAME[url.removeprefix(PROFILE_BASE)] for url in applicable_profiles(resource, nominated)
    ]
    issues = list(_base_rules(resource, resolve, bp="bp" in {p.name for p in specific}))
    for profile in specific:
        issues.extend(_specific_rules(resource, profile))
    return issues


def _issue(where: str, message: str, code: str, severity: str = "error") -> Issue:
    return Issue(message, (f"Observation{where}",), code, severity)


_BASE = "(vital-signs profile)"


def _base_rules(resource: dict[str, Any], resolve: Resolver | None, *, bp: bool) -> Iterator[Issue]:
    if resource.get("status") is None:
        yield _issue(".status", f"required element is missing {_BASE}", "required")
    if not any(
        _has_coding(cat, CATEGORY_SYSTEM, "vital-signs") for cat in _dicts(resource.get("category"))
    ):
        yield _issue(
            ".category",
            f"must contain the coding {CATEGORY_SYSTEM}#vital-signs {_BASE}",
            "required",
        )
    yield from _subject_rules(resource, resolve)
    yield from _effective_rules(resource)
    has_value = any(resource.get(name) is not None for name in _VALUE_CHOICES)
    components = resource.get("component")
    members = resource.get("hasMember")
    if not components and not members and not has_value and not resource.get("dataAbsentReason"):
        yield _issue(
            "",
            f"vs-2: without component or hasMember, a value[x] or a dataAbsentReason is "
            f"required {_BASE}",
            "invariant",
        )
    for index, component in enumerate(components if isinstance(components, list) else []):
        if not isinstance(component, dict):
            continue
        where = f".component[{index}]"
        if not any(component.get(n) is not None for n in _VALUE_CHOICES) and not component.get(
            "dataAbsentReason"
        ):
            yield _issue(
                where, f"vs-3: a value[x] or a dataAbsentReason is required {_BASE}", "invariant"
            )
        codes = _loinc_codes(component.get("code"))
        if bp and codes & {SYSTOLIC, DIASTOLIC}:
            continue  # the blood-pressure profile's slice rules are stricter (mm[Hg] only)
        quantity = component.get("valueQuantity")
        if isinstance(quantity, dict):
            yield from _ucum_binding(where + ".valueQuantity", quantity)


def _ucum_binding(where: str, quantity: dict[str, Any]) -> Iterator[Issue]:
    """component.value[x]'s required binding to ucum-vitals-common (system and code)."""
    if quantity.get("system") != UCUM:
        yield _issue(
            where + ".system",
            f"must be {UCUM} (component values are bound to ucum-vitals-common) {_BASE}",
            "required" if quantity.get("system") is None else "value",
        )
    if quantity.get("code") not in UCUM_VITALS_COMMON:
        yield _issue(
            where + ".code",
            "must be a UCUM code of ValueSet ucum-vitals-common "
            f"({', '.join(UCUM_VITALS_COMMON)}) {_BASE}",
            "required" if quantity.get("code") is None else "code-invalid",
        )


def _subject_rules(resource: dict[str, Any], resolve: Resolver | None) -> Iterator[Issue]:
    subject = resource.get("subject")
    if subject is None:
        yield _issue(".subject", f"required element is missing {_BASE}", "required")
        return
    if not isinstance(subject, dict):
        return
    stated = subject.get("type")
    if isinstance(stated, str) and stated != "Patient":
        yield _issue(
            ".subject.type", f"must be Patient: subject is Reference(Patient) {_BASE}", "value"
        )
        return
    target = _reference_type(subject.get("reference"), resource, resolve)
    if target is not None and target != "Patient":
        yield _issue(
            ".subject.reference",
            f"must refer to a Patient: subject is Reference(Patient) {_BASE}",
            "value",
        )


def _reference_type(
    reference: Any, resource: dict[str, Any], resolve: Resolver | None
) -> str | None:
    """The type a reference points to, or None when the reference alone cannot tell."""
    if not isinstance(reference, str):
        return None
    if reference.startswith("#"):
        for contained in _dicts(resource.get("contained")):
            if contained.get("id") == reference[1:]:
                kind = contained.get("resourceType")
                return kind if isinstance(kind, str) else None
        return None
    if resolve is not None and (found := resolve(reference)) is not None:
        return found
    match = _REFERENCE_TYPE.search(reference)
    return match.group(1) if match else None


def _effective_rules(resource: dict[str, Any]) -> Iterator[Issue]:
    other = [name for name in _EFFECTIVE_OTHER if resource.get(name) is not None]
    for name in other:
        yield _issue(
            f".{name}",
            f"not allowed: effective[x] must be a dateTime or a Period {_BASE}",
            "structure",
        )
    moment = resource.get("effectiveDateTime")
    if moment is None and resource.get("effectivePeriod") is None:
        if not other:
            yield _issue(
                ".effective",
                f"required element is missing (effectiveDateTime or effectivePeriod) {_BASE}",
                "required",
            )
        return
    if isinstance(moment, str) and not _DAY_PRECISION.match(moment):
        yield _issue(
            ".effectiveDateTime", f"vs-1: must be precise to at least the day {_BASE}", "invariant"
        )


def _specific_rules(resource: dict[str, Any], profile: VitalProfile) -> Iterator[Issue]:
    label = f"({profile.title} profile, {profile.url})"
    if not _has_coding(resource.get("code"), LOINC, profile.loinc):
        extra = ""
        if profile.name == "oxygensat":
            extra = f"; {SPO2_PULSE_OXIMETRY} may be added, not substituted"
        yield _issue(
            ".code",
            f"must contain the coding {LOINC}#{profile.loinc}{extra} {label}",
            "required" if profile.loinc_required else "value",
            "error" if profile.loinc_required else "warning",
        )
    present = [name for name in _VALUE_CHOICES if resource.get(name) is not None]
    if profile.value_forbidden:
        for name in present:
            yield _issue(f".{name}", f"not allowed: value[x] is 0..0 {label}", "structure")
    else:
        for name in present:
            if name != "valueQuantity":
                yield _issue(
                    f".{name}", f"not allowed: value[x] must be a Quantity {label}", "structure"
                )
        quantity = resource.get("valueQuantity")
        if isinstance(quantity, dict) and profile.units:
            yield from _quantity_rules(".valueQuantity", quantity, profile.units, label)
        elif quantity is None and profile.value_required:
            yield _issue(".valueQuantity", f"required element is missing {label}", "required")
    if profile.has_member_required and not resource.get("hasMember"):
        yield _issue(".hasMember", f"required element is missing {label}", "required")
    if profile.components:
        yield from _component_slices(resource, profile, label)


def _quantity_rules(
    where: str, quantity: dict[str, Any], units: tuple[str, ...], label: str
) -> Iterator[Issue]:
    for name in ("value", "unit"):
        if quantity.get(name) is None:
            yield _issue(f"{where}.{name}", f"required element is missing {label}", "required")
    system = quantity.get("system")
    if system != UCUM:
        yield _issue(
            f"{where}.system", f"must be {UCUM} {label}", "required" if system is None else "value"
        )
    code = quantity.get("code")
    if code not in units:
        expected = units[0] if len(units) == 1 else " or ".join(units)
        yield _issue(
            f"{where}.code",
            f"must be the UCUM code {expected} {label}",
            "required" if code is None else "code-invalid",
        )


def _component_slices(
    resource: dict[str, Any], profile: VitalProfile, label: str
) -> Iterator[Issue]:
    found: dict[str, list[tuple[int, dict[str, Any]]]] = {code: [] for code in profile.components}
    components = resource.get("component")
    for index, component in enumerate(components if isinstance(components, list) else []):
        if not isinstance(component, dict):
            continue
        for code in profile.components:
            if _has_coding(component.get("code"), LOINC, code):
                found[code].append((index, component))
    for code, matches in found.items():
        title = _COMPONENT_TITLES.get(code, code)
        if not matches:
            yield _issue(
                ".component",
                f"must contain a component coded {LOINC}#{code} ({title}) {label}",
                "required",
            )
        for index, _ in matches[1:]:
            yield _issue(
                f".component[{index}]",
                f"a second {title} component is not allowed (slice is 1..1) {label}",
                "structure",
            )
        for index, component in matches:
            where = f".component[{index}]"
            for name in _VALUE_CHOICES:
                if name != "valueQuantity" and component.get(name) is not None:
                    yield _issue(
                        f"{where}.{name}",
                        f"not allowed: the {title} value must be a Quantity {label}",
                        "structure",
                    )
            quantity = component.get("valueQuantity")
            if isinstance(quantity, dict):
                yield from _quantity_rules(where + ".valueQuantity", quantity, ("mm[Hg]",), label)
