"""The API benchmark's floor: a trivial Flask JSON endpoint, served the same way as fhirbridge
(gunicorn, same worker count), so the ratio measures fhirbridge's work, not the stack's.

    gunicorn -w 2 'bench.trivial_app:create_app()'
"""

from __future__ import annotations

from flask import Flask, Response, jsonify, request


def create_app() -> Flask:
    app = Flask(__name__)

    @app.post("/echo")
    def echo() -> Response:
        body = request.get_json()  # parse the same body fhirbridge gets
        return jsonify({"ok": True, "keys": len(body) if isinstance(body, dict) else 0})

    return app
