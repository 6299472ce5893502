"""Request bodies: the one place a view reads a JSON document or a search form from a client.

Every limit on what a client may send is enforced here, before the pipeline sees it:

* content type: JSON only (``application/json``, ``application/fhir+json``), else 415;
* size: ``max_body_bytes`` (the app's ``MAX_CONTENT_LENGTH``), else 413 ``too-long``. werkzeug
  refuses a Content-Length over the limit, but a chunked body (no Content-Length) behind a
  server that terminates the stream (gunicorn, the dev server) is silently cut at the limit and
  handed over as if complete; so after a body of exactly the limit we read one more byte;
* syntax: malformed JSON is 400 ``structure`` with the position only (orjson's own message
  quotes the document);
* cost: nesting deeper than ``max_json_depth`` or any array longer than ``max_array_length`` is
  400 ``too-costly``, naming the limit and never the content. The walk is iterative, so a deep
  document cannot exhaust the Python stack here or later (the pipeline, the validators and the
  store all recurse); orjson itself refuses anything nested deeper than 1024, the same 400.
  The depth limit is at most ``DEPTH_CEILING`` whatever the setting allows (see there).
"""

from __future__ import annotations

from typing import Any, Final

import orjson
from flask import request
from werkzeug.exceptions import RequestEntityTooLarge

from fhirbridge.api.http import services
from fhirbridge.errors import BadRequestError, Issue, UnsupportedMediaTypeError

__all__ = [
    "DEPTH_CEILING",
    "JSON_TYPES",
    "cost_problem",
    "max_depth",
    "read_body",
    "read_form",
    "read_json_body",
]

JSON_TYPES: Final = frozenset({"application/json", "application/fhir+json"})
#: The deepest document every consumer takes: jsonschema-rs (the R4 JSON Schema, $validate)
#: raises ValueError("Recursion limit reached") just past 256 levels, which would be a 500.
#: The deepest ``max_json_depth`` the settings accept; the cap also guards direct callers.
DEPTH_CEILING: Final = 256

# orjson's JSONDecodeError.msg for a document nested deeper than it parses (1024)
_ORJSON_DEPTH_MSG: Final = "depth limit exceeded"


def read_body(*, cache: bool = False) -> bytes:
    """The raw request body, or 413 (``too-long``) when it is larger than ``max_body_bytes``.

    ``cache=True`` keeps the bytes on the request so that ``request.form`` parses them.
    """
    limit = request.max_content_length
    try:
        data = request.get_data(cache=cache)
        if limit is not None and len(data) >= limit and _more_than_read():
            raise RequestEntityTooLarge()
    except RequestEntityTooLarge:
        raise RequestEntityTooLarge(
            f"the request body is larger than the limit of {limit} bytes"
        ) from None
    return data


def _more_than_read() -> bool:
    """After a body of exactly the limit: does the client's stream hold more?

    Only a body without Content-Length can be cut (werkzeug enforces a declared length before
    reading); the server terminates that stream, so one more byte can be asked for safely.
    """
    if request.content_length is not None:
        return False
    stream = request.environ.get("wsgi.input")
    return stream is not None and bool(stream.read(1))


def read_json_body() -> Any:
    """The request body as JSON within the service's limits, else a 415 / 413 / 400."""
    if request.mimetype not in JSON_TYPES:
        raise UnsupportedMediaTypeError()
    settings = services().settings
    depth = max_depth(settings.max_json_depth)
    raw = read_body()
    try:
        document = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if exc.msg == _ORJSON_DEPTH_MSG:
            raise _too_costly(_depth_message(depth)) from None
        # orjson's message quotes part of the document: report only the position.
        raise BadRequestError(
            "malformed JSON",
            [Issue(f"malformed JSON at line {exc.lineno}, column {exc.colno}", code="structure")],
        ) from None
    problem = cost_problem(document, max_depth=depth, max_array_length=settings.max_array_length)
    if problem is not None:
        raise _too_costly(problem)
    return document


def read_form() -> list[tuple[str, str]]:
    """The fields of a form-urlencoded body, in order, within the size limit (else 413)."""
    read_body(cache=True)  # request.form parses the cached bytes, not the stream again
    return list(request.form.items(multi=True))


def max_depth(configured: int) -> int:
    """The depth limit in force: the setting, capped at ``DEPTH_CEILING``."""
    return min(configured, DEPTH_CEILING)


def cost_problem(document: Any, *, max_depth: int, max_array_length: int) -> str | None:
    """What makes ``document`` too costly to process (a limit, never content), else None.

    Depth counts containers: ``[]`` and ``{}`` are depth 1, ``{"a": [1]}`` is depth 2.
    """
    if not isinstance(document, dict | list):
        return None
    stack: list[tuple[dict[str, Any] | list[Any], int]] = [(document, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > max_depth:
            return _depth_message(max_depth)
        if isinstance(node, list):
            if len(node) > max_array_length:
                return f"a JSON array is longer than the limit of {max_array_length} items"
            children: Any = node
        else:
            children = node.values()
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return None


def _depth_message(max_depth: int) -> str:
    return f"the JSON document is nested deeper than the limit of {max_depth} levels"


def _too_costly(message: str) -> BadRequestError:
    return BadRequestError(message, [Issue(message, code="too-costly")])
