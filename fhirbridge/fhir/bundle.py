"""Build FHIR Bundles from produced resources (pure)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def transaction_bundle(resources: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """A transaction Bundle that PUTs each resource at its deterministic id.

    Ids are UUIDs, so each entry's fullUrl is `urn:uuid:<id>`; references inside the resources
    use the `Type/id` form, which the receiving server resolves to the PUT targets. Re-sending the
    same Bundle is idempotent on any server that allows update-as-create.
    """
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": f"urn:uuid:{r['id']}",
                "resource": r,
                "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"},
            }
            for r in resources
        ],
    }


def searchset_bundle(
    resources: Iterable[dict[str, Any]],
    *,
    base_url: str,
    total: int | None = None,
    links: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A searchset Bundle with absolute fullUrls."""
    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset"}
    if total is not None:
        bundle["total"] = total
    if links:
        bundle["link"] = [{"relation": rel, "url": url} for rel, url in links.items()]
    bundle["entry"] = [
        {
            "fullUrl": f"{base_url.rstrip('/')}/{r['resourceType']}/{r['id']}",
            "resource": r,
            "search": {"mode": "match"},
        }
        for r in resources
    ]
    if not bundle["entry"]:
        del bundle["entry"]
    return bundle
