"""The API contract over HTTP: GET /openapi.yaml and an offline Swagger UI at GET /docs.

The spec is ``fhirbridge/openapi.yaml``, shipped in the package (the repository's top-level
``openapi.yaml`` is a symlink to it). On disk it reuses the mapping pack's source JSON Schema
by reference: ``components.schemas.Submission`` is a ``$ref`` to the schema file. Served, that
reference is replaced by the source schema of the pack this instance loaded (its internal
``$ref``s re-rooted), so the served spec is self-contained (every ``$ref`` starts with ``#``,
nothing to fetch) and describes exactly what this instance validates submissions with.

/docs is Swagger UI 5 (it renders OpenAPI 3.1) from the ``flask-swagger-ui`` package's bundled
``dist``, served by us under /docs/assets/. The page and its start-up script name only our own
paths and a strict Content-Security-Policy lets the browser load nothing else, so the page
works with no internet and never calls out.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterator, Mapping
from importlib.resources import files
from importlib.resources.abc import Traversable
from typing import Any, Final

import yaml
from flask import Blueprint, Flask, Response, current_app, request, url_for
from markupsafe import escape

from fhirbridge.api.access import public
from fhirbridge.api.http import services
from fhirbridge.errors import NotFoundError

__all__ = ["CSP", "bp", "embed_schema", "external_refs", "init_app", "served_spec"]

bp = Blueprint("docs", __name__)

SPEC_FILE: Final = "openapi.yaml"
#: The component that stands for the submission body (the pack's source schema).
SUBMISSION: Final = "Submission"
YAML_MIMETYPE: Final = "application/yaml"
_EXTENSION: Final = "fhirbridge.openapi"

# Everything the page may load comes from this origin; nothing inline, nothing framed.
# img-src data: for the icons Swagger UI's stylesheet embeds as data: URIs.
CSP: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
_SECURITY_HEADERS: Final = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

# The Swagger UI files /docs uses, from flask-swagger-ui's dist (name → content type).
_DIST_ASSETS: Final = {
    "swagger-ui.css": "text/css; charset=utf-8",
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "favicon-32x32.png": "image/png",
}
_START_SCRIPT: Final = "fhirbridge-docs.js"
# Starts Swagger UI on the spec the page names; no validator badge (it would call out), no
# persisted credentials, and "Try it out" sends requests to this service only.
_START_JS: Final = """\
window.addEventListener("load", function () {
  "use strict";
  var root = document.getElementById("swagger-ui");
  window.ui = SwaggerUIBundle({
    url: root.getAttribute("data-spec-url"),
    domNode: root,
    deepLinking: true,
    validatorUrl: null,
    persistAuthorization: false,
    tryItOutEnabled: false,
    presets: [SwaggerUIBundle.presets.apis],
    layout: "BaseLayout"
  });
});
"""
_ASSET_MAX_AGE: Final = 3600

_PAGE: Final = """\
<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>fhirbridge API</title>
<link rel="stylesheet" href="{css}">
<link rel="icon" type="image/png" href="{icon}">
</head>
<body>
<div id="swagger-ui" data-spec-url="{spec}"></div>
<script src="{bundle}"></script>
<script src="{start}"></script>
</body>
</html>
"""


# ---------------------------------------------------------------- the spec


def spec_resource() -> Traversable:
    """The spec file shipped in the package."""
    return files("fhirbridge").joinpath(SPEC_FILE)


def _walk_refs(node: Any, skip: frozenset[str] = frozenset()) -> Iterator[dict[str, Any]]:
    """Every mapping that holds a string ``$ref`` (values of `skip` keys are data, not schemas)."""
    if isinstance(node, dict):
        if isinstance(node.get("$ref"), str):
            yield node
        for key, value in node.items():
            if key not in skip:
                yield from _walk_refs(value, skip)
    elif isinstance(node, list):
        for item in node:
            yield from _walk_refs(item, skip)


# Keywords whose values are instance data: a "$ref" in there is not a reference.
_DATA_KEYWORDS: Final = frozenset({"const", "enum", "default", "examples", "example"})


def external_refs(spec: Mapping[str, Any]) -> set[str]:
    """The ``$ref`` values that point outside the document (anything not starting with #)."""
    return {
        node["$ref"]
        for node in _walk_refs(spec, _DATA_KEYWORDS)
        if not node["$ref"].startswith("#")
    }


def embed_schema(schema: Mapping[str, Any], pointer: str) -> dict[str, Any]:
    """`schema` made fit to live at JSON pointer `pointer` ("#/components/schemas/X").

    Its ``$id`` and ``$schema`` go (an embedded ``$id`` would move the base URI every
    re-rooted reference resolves against); every internal ``#...`` reference is re-rooted under
    `pointer`. A reference to another file cannot be embedded: ValueError.
    """
    embedded = copy.deepcopy(dict(schema))
    embedded.pop("$id", None)
    embedded.pop("$schema", None)
    for node in _walk_refs(embedded, _DATA_KEYWORDS):
        ref: str = node["$ref"]
        if not ref.startswith("#"):
            raise ValueError(f"source schema $ref to another document cannot be embedded: {ref}")
        node["$ref"] = pointer + ref[1:]
    return embedded


def served_spec(source_schema: Mapping[str, Any], server_url: str = "/") -> dict[str, Any]:
    """The packaged spec with the pack's source schema in place of its file reference."""
    spec: dict[str, Any] = yaml.load(spec_resource().read_text("utf-8"), Loader=yaml.CSafeLoader)
    pointer = f"#/components/schemas/{SUBMISSION}"
    spec["components"]["schemas"][SUBMISSION] = embed_schema(source_schema, pointer)
    spec["servers"] = [{"url": server_url, "description": "This service."}]
    return spec


def _spec_text(server_url: str) -> str:
    """The served YAML, built on first use and kept per server URL (one per mount point)."""
    cache: dict[str, str] = current_app.extensions.setdefault(_EXTENSION, {})
    if server_url not in cache:
        spec = served_spec(services().pack.source_schema, server_url)
        cache[server_url] = yaml.dump(
            spec, Dumper=yaml.CSafeDumper, sort_keys=False, allow_unicode=True, width=100
        )
    return cache[server_url]


@bp.get("/openapi.yaml")
@public
def openapi_yaml() -> Response:
    """GET /openapi.yaml: the OpenAPI 3.1 description of this service, self-contained."""
    response = Response(_spec_text(request.script_root or "/"), mimetype=YAML_MIMETYPE)
    response.headers["Cache-Control"] = "no-cache"
    response.add_etag()
    response.make_conditional(request)
    return response


# ---------------------------------------------------------------- Swagger UI


@functools.cache
def _dist_bytes(name: str) -> bytes:
    """One file of flask-swagger-ui's Swagger UI dist (read once per process)."""
    return files("flask_swagger_ui").joinpath("dist", name).read_bytes()


@bp.get("/docs")
@public
def page() -> Response:
    """GET /docs: Swagger UI on /openapi.yaml, every asset from this service."""
    html = _PAGE.format(
        css=escape(url_for("docs.asset", name="swagger-ui.css")),
        icon=escape(url_for("docs.asset", name="favicon-32x32.png")),
        spec=escape(url_for("docs.openapi_yaml")),
        bundle=escape(url_for("docs.asset", name="swagger-ui-bundle.js")),
        start=escape(url_for("docs.asset", name=_START_SCRIPT)),
    )
    response = Response(html, mimetype="text/html")
    response.headers.update(_SECURITY_HEADERS)
    response.headers["Cache-Control"] = "no-cache"
    return response


@bp.get("/docs/assets/<name>")
@public
def asset(name: str) -> Response:
    """GET /docs/assets/{name}: one of the few files the page loads (anything else: 404)."""
    if name == _START_SCRIPT:
        response = Response(_START_JS, content_type="text/javascript; charset=utf-8")
    elif name in _DIST_ASSETS:
        response = Response(_dist_bytes(name), content_type=_DIST_ASSETS[name])
    else:
        raise NotFoundError("no such documentation asset")
    response.headers.update(_SECURITY_HEADERS)
    response.cache_control.public = True
    response.cache_control.max_age = _ASSET_MAX_AGE
    response.add_etag()
    response.make_conditional(request)
    return response


def init_app(app: Flask) -> None:
    app.register_blueprint(bp)
