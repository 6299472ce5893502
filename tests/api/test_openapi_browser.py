"""/docs in a real headless Chromium: Swagger UI renders the spec and calls out to nothing.

The page is served for real on 127.0.0.1. In the browser: every operation of the spec is listed,
the submission body shows the source schema, "Try it out" on /healthz gets its answer, the
console has no error (a Content-Security-Policy violation is one) and every request that went
over the network went to this service. That is what "works with no internet" means.

Needs Debian's chromium and chromium-driver (scripts/install-browser); without them the test
skips with that reason, except under CI=true, where it fails.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from werkzeug.serving import make_server

from fhirbridge import create_app
from fhirbridge.settings import Settings
from tests.browser import headless_chromium

ROOT = Path(__file__).resolve().parents[2]
WAIT = 30  # seconds: a 1.7 MB bundle parsed on two shared cores
# What goes over a network (the browser's own chrome:// pages and data: URIs do not).
NETWORK = ("http:", "https:", "ws:", "wss:", "ftp:")


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    with headless_chromium(tmp_path, page_load_timeout=WAIT, logs=True) as driver:
        yield driver


@pytest.fixture
def base_url(tmp_path: Path) -> Iterator[str]:
    app = create_app(
        Settings(
            database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
            mappings_dir=ROOT / "mappings",
            db_auto_upgrade=True,
            ui_session_secret="docs-browser-test",
        )
    )
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, name="docs-app")
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
        app.extensions["fhirbridge"].store.close()


def _requested_urls(driver: Any) -> set[str]:
    urls = set()
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.add(message["params"]["request"]["url"])
    return urls


def test_the_docs_page_renders_the_spec_offline(browser: Any, base_url: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    spec = yaml.safe_load((ROOT / "openapi.yaml").read_text())
    operations = sum(len(item) for item in spec["paths"].values())
    wait = WebDriverWait(browser, WAIT)

    browser.get(f"{base_url}/docs")
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".opblock")) == operations)
    assert browser.find_element(By.CSS_SELECTOR, ".info .title").text.startswith("fhirbridge")
    assert browser.find_elements(By.CSS_SELECTOR, ".auth-wrapper .authorize")  # security schemes

    # The submission body is the pack's source schema (embedded in the served spec).
    submissions = browser.find_element(By.ID, "operations-submissions-createSubmission")
    submissions.find_element(By.CSS_SELECTOR, ".opblock-summary").click()
    body = ".opblock-section-request-body .body-param__example"
    wait.until(lambda d: submissions.find_elements(By.CSS_SELECTOR, body))
    example = submissions.find_element(By.CSS_SELECTOR, body).text
    assert '"source"' in example and '"patient"' in example and '"doses"' in example

    # "Try it out" reaches this service (connect-src 'self', servers "/").
    healthz = browser.find_element(By.ID, "operations-operations-healthz")
    healthz.find_element(By.CSS_SELECTOR, ".opblock-summary").click()
    wait.until(lambda d: healthz.find_elements(By.CSS_SELECTOR, ".try-out__btn"))
    healthz.find_element(By.CSS_SELECTOR, ".try-out__btn").click()
    healthz.find_element(By.CSS_SELECTOR, ".execute").click()
    wait.until(lambda d: healthz.find_elements(By.CSS_SELECTOR, ".live-responses-table"))
    assert '"status": "ok"' in healthz.find_element(By.CSS_SELECTOR, ".live-responses-table").text

    problems = [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
    assert problems == []  # a CSP violation is logged as SEVERE
    network = {url for url in _requested_urls(browser) if url.startswith(NETWORK)}
    assert network, "the page's own requests were recorded"
    assert {url for url in network if not url.startswith(base_url + "/")} == set()
