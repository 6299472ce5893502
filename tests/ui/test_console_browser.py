"""The ops console in a real headless Chromium, against a real FHIR server behind a fault proxy.

A submission is delivered to sekmet through the fault proxy, which answers the write with a
422 OperationOutcome: the worker dead-letters it. In the browser: sign in with an API key,
see the dead letters with the server's error (its free text stripped), clear the fault, press
Replay on one and Replay all for the rest, run the worker, reload, see everything delivered.

Needs Debian's chromium and chromium-driver (scripts/install-browser); without them the test
skips with that reason, except under CI=true, where it fails.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask
from werkzeug.serving import BaseWSGIServer, make_server

from fhirbridge.sync.outbox import Outbox
from fhirbridge.sync.retry import RetryPolicy
from fhirbridge.sync.runtime import build_runtimes
from fhirbridge.sync.targets import load_targets
from fhirbridge.sync.worker import Worker
from tests.browser import headless_chromium
from tests.integration.fault_proxy import Fault, FaultProxy
from tests.ui.support import ADMIN_KEY, DOC, SUBMITTER_KEY, assert_no_phi, make_app

pytestmark = pytest.mark.integration

TARGET = "research-store"
WAIT = 15  # seconds for a page to load after a click
# What the "hospital" answers: a business-rule rejection whose diagnostics echo patient data.
REJECTION = {
    "resourceType": "OperationOutcome",
    "issue": [
        {
            "severity": "error",
            "code": "business-rule",
            "details": {"coding": [{"system": "urn:example:ehr-errors", "code": "MPI-404"}]},
            "diagnostics": f"no chart for {DOC['patient']['name']['family']} "
            f"{DOC['patient']['mrn']} born {DOC['patient']['birthDate']}",
            "expression": ["Bundle.entry[0].resource.identifier"],
        }
    ],
}
SERVER_ERROR = "error/business-rule [urn:example:ehr-errors|MPI-404] @ Bundle.entry[0].resource"


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    with headless_chromium(tmp_path, page_load_timeout=WAIT) as driver:
        yield driver


class Served:
    """The app served for real over HTTP on 127.0.0.1 (werkzeug, threaded) until close()."""

    def __init__(self, app: Flask) -> None:
        self.app = app
        self.server: BaseWSGIServer = make_server("127.0.0.1", 0, app, threaded=True)
        self.base_url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="ui-app")
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)
        self.app.extensions["fhirbridge"].store.close()


@pytest.fixture
def served(tmp_path: Path, fault_proxy: FaultProxy) -> Iterator[Served]:
    # Only Patient and Medication go to this target: one transaction, two rows.
    app = make_app(
        tmp_path, base_url=fault_proxy.base_url, resource_types=["Patient", "Medication"]
    )
    served = Served(app)
    try:
        yield served
    finally:
        served.close()


def _worker(served: Served, tmp_path: Path) -> Worker:
    svc = served.app.extensions["fhirbridge"]
    targets = load_targets(tmp_path / "targets.json")
    return Worker(
        svc.store,
        svc.outbox,
        build_runtimes(targets),
        owner="browser-test",
        rng=random.Random(5),
        policy=RetryPolicy(base_delay=0.01, max_delay=0.05),
    )


def _statuses(served: Served) -> dict[str, str]:
    outbox: Outbox = served.app.extensions["fhirbridge"].outbox
    return {d.resource_type: d.status for d in outbox.deliveries(target=TARGET, limit=100)}


def _click_and_wait(driver: Any, element: Any) -> None:
    """Click a submit button and wait until the next page (after the redirect) is loaded."""
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.support.ui import WebDriverWait

    # Mark the current document; the next page is a new document without the mark. (Waiting
    # for the old <html> element to go stale raced in chromedriver: "Node with given id does
    # not belong to the document" when the check ran mid-navigation.)
    driver.execute_script("window.__fhirbridgeOldPage = true;")
    element.click()
    WebDriverWait(driver, WAIT, ignored_exceptions=(WebDriverException,)).until(
        lambda d: d.execute_script(
            "return window.__fhirbridgeOldPage === undefined && document.readyState === 'complete'"
        )
    )


def _cell(driver: Any, css: str) -> str:
    text: str = driver.find_element("css selector", f"#target-{TARGET} {css}").text
    return text.strip()


def test_dead_letter_seen_replayed_and_delivered_in_a_browser(
    browser: Any, served: Served, fault_proxy: FaultProxy, fhir_server: Any, tmp_path: Path
) -> None:
    # A real submission through the API, then a real delivery the server rejects.
    resp = requests.post(
        f"{served.base_url}/api/v1/submissions",
        json=DOC,
        headers={"X-API-Key": SUBMITTER_KEY},
        timeout=30,
    )
    assert resp.status_code == 201, resp.text
    patient_id = next(r["id"] for r in resp.json()["resources"] if r["resourceType"] == "Patient")
    fault_proxy.push(Fault("status", status=422, body=REJECTION, match_method="POST", times=5))
    worker = _worker(served, tmp_path)
    assert worker.run_once() == 2
    assert _statuses(served) == {"Patient": "dead", "Medication": "dead"}
    assert fault_proxy.faults_applied  # the rejection came through the wire

    # Sign in: the console sends a browser without a session to the form.
    browser.get(f"{served.base_url}/ui")
    assert browser.current_url.endswith("/ui/login")
    browser.find_element("id", "api_key").send_keys(ADMIN_KEY)
    _click_and_wait(browser, browser.find_element("id", "sign-in"))
    assert browser.current_url.endswith("/ui")
    assert "Signed in as ops-admin." in browser.find_element("id", "flash").text
    assert "ops-admin" in browser.find_element("id", "who").text

    # The dead letters, with the server's error (its diagnostics, which name the patient, gone).
    rows = browser.find_elements("css selector", f"#target-{TARGET} tr.dead-letter")
    assert len(rows) == 2
    for row in rows:
        error = row.find_element("css selector", "td.error").text
        assert error.startswith("ehr_rejected: 422 ") and SERVER_ERROR in error, error
    assert _cell(browser, "td.dead") == "2"
    assert SERVER_ERROR in _cell(browser, "dd.last-error")
    assert _cell(browser, "dd.last-success") == "never"
    submission = browser.find_element("css selector", "#submissions tr.submission")
    assert "2 dead" in submission.find_element("css selector", "td.delivery").text
    assert_no_phi(browser.page_source)
    browser.save_screenshot(str(tmp_path / "console-dead-letters.png"))

    # The hospital fixed its side: no more faults. Replay one dead letter.
    fault_proxy.clear()
    medication_row = browser.find_element(
        "xpath", "//tr[contains(@class,'dead-letter')][td[starts-with(., 'Medication/')]]"
    )
    _click_and_wait(browser, medication_row.find_element("css selector", "button.replay"))
    assert "queued again" in browser.find_element("id", "flash").text
    assert _statuses(served)["Medication"] == "queued"
    assert worker.run_once() == 1
    browser.refresh()
    assert _cell(browser, "td.dead") == "1"
    assert _cell(browser, "td.sent") == "1"
    assert _cell(browser, "dd.last-success") != "never"

    # Replay all (the Patient), deliver, reload: nothing left anywhere.
    _click_and_wait(browser, browser.find_element("css selector", f"#target-{TARGET} .replay-all"))
    assert f"{TARGET}: 1 dead letter queued again." in browser.find_element("id", "flash").text
    assert worker.run_once() == 1
    browser.get(f"{served.base_url}/ui")
    assert _statuses(served) == {"Patient": "sent", "Medication": "sent"}
    assert _cell(browser, "td.queue") == "0"
    assert _cell(browser, "td.dead") == "0"
    assert _cell(browser, "td.sent") == "2"
    assert browser.find_elements("css selector", f"#target-{TARGET} tr.dead-letter") == []
    submission = browser.find_element("css selector", "#submissions tr.submission")
    assert submission.find_element("css selector", "td.delivery").text == "2 sent"
    browser.save_screenshot(str(tmp_path / "console-delivered.png"))
    # the submission's own page: each of its resources, per target
    _click_and_wait(browser, submission.find_element("css selector", "a"))
    rows = browser.find_elements("css selector", f"#delivery-{TARGET} tr.delivery-row")
    assert sorted(r.find_element("css selector", "td").text.split("/")[0] for r in rows) == [
        "Medication",
        "Patient",
    ]
    assert {r.find_element("css selector", "span.state").text for r in rows} == {"sent"}
    assert_no_phi(browser.page_source)
    # and the records are on the FHIR server
    assert fhir_server.read("Patient", patient_id).status_code == 200
    assert fhir_server.count("Medication") == 1
    # signing out ends the session: the console sends the browser to the form again
    _click_and_wait(browser, browser.find_element("id", "logout"))
    assert browser.current_url.endswith("/ui/login")
    browser.get(f"{served.base_url}/ui")
    assert browser.current_url.endswith("/ui/login")
