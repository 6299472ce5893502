"""What elements FHIR R4 types have, read from the fhir.resources R4B models (R4B = R4 here).

Used by the mapping checker to tell whether a path a rule writes exists, and of which type.
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass
from functools import cache
from typing import Any

from fhir.resources.R4B import get_fhir_model_class


@dataclass(frozen=True, slots=True)
class Element:
    """One element of a FHIR type: its child type (None for a primitive) and cardinality."""

    name: str
    type_name: str | None
    is_list: bool


def _model(type_name: str) -> Any:
    try:
        return get_fhir_model_class(type_name)
    except (KeyError, ValueError):
        return None


@cache
def is_type(type_name: str) -> bool:
    """Whether `type_name` is an R4 resource, data type or backbone element known to R4B."""
    return _model(type_name) is not None


@cache
def elements(type_name: str) -> dict[str, Element]:
    """The JSON elements of a type, by their JSON name (`class`, not `class_fhir`)."""
    model = _model(type_name)
    if model is None:
        return {}
    out: dict[str, Element] = {}
    for field_name, info in model.model_fields.items():
        name = info.alias or field_name
        if name.startswith("_") or name == "resource_type":
            continue
        child, is_list = _unwrap(info.annotation)
        out[name] = Element(name, child, is_list)
    return out


def _unwrap(annotation: Any) -> tuple[str | None, bool]:
    is_list = False
    while True:
        origin = typing.get_origin(annotation)
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if origin in (list, typing.List):  # noqa: UP006 - the models use typing.List
            is_list = True
            annotation = args[0]
        elif origin in (typing.Union, types.UnionType):
            annotation = args[0]
        elif origin is typing.Annotated:
            return None, is_list
        else:
            break
    name = getattr(annotation, "__name__", "")
    if name.endswith("Type") and is_type(name[: -len("Type")]):
        return name[: -len("Type")], is_list
    return None, is_list
