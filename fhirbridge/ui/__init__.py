"""The ops console at /ui: delivery status, dead letters and replay in a browser, no build step.

`init_app(app, settings)` installs the console's cookie sessions (fhirbridge.ui.session),
registers the pages (fhirbridge.ui.views) and adds the session as a credential source of
fhirbridge.auth, consulted on /ui requests that send no Authorization or X-API-Key header.
Call it after fhirbridge.auth.init_app. Templates and the one stylesheet ship in the package.
"""

from __future__ import annotations

from flask import Flask

from fhirbridge.auth import add_credential_source
from fhirbridge.settings import Settings
from fhirbridge.ui.session import ConsoleSessionInterface, credential_source, session_key
from fhirbridge.ui.views import bp

__all__ = ["init_app"]


def init_app(app: Flask, settings: Settings) -> None:
    app.session_interface = ConsoleSessionInterface(session_key(settings.ui_session_secret))
    add_credential_source(app, credential_source(settings.auth_api_keys))
    app.register_blueprint(bp)
