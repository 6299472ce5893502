"""Shared by the browser tests: a headless Debian Chromium driven through chromedriver.

``headless_chromium`` opens one (its profile and the driver's log under the test's tmp_path)
and quits it at the end. Without /usr/bin/chromium and /usr/bin/chromedriver
(scripts/install-browser installs them), or without selenium, the test skips with the reason,
except under CI=true, where it fails.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1280,1600",
)


def unavailable(reason: str) -> NoReturn:
    """Skip the test with `reason`; fail it under CI=true, where the browser must be there."""
    if os.environ.get("CI") == "true":
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


@contextmanager
def headless_chromium(
    tmp_path: Path, *, page_load_timeout: float, logs: bool = False
) -> Iterator[Any]:
    """A selenium Chrome driver on Debian's Chromium; `logs` keeps its console and network
    logs (``driver.get_log("browser")`` and ``driver.get_log("performance")``)."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        unavailable(
            f"no headless browser: {', '.join(missing)} missing "
            "(scripts/install-browser installs Debian's chromium and chromium-driver)"
        )
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        unavailable("selenium is not installed: pip install -e '.[test]'")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    if logs:
        options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    service = Service(str(CHROMEDRIVER), log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(page_load_timeout)
    try:
        yield driver
    finally:
        driver.quit()
