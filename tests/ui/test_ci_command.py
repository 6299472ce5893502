"""The README's test command is exactly what CI runs (.ci/run), browser install included."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_readme_test_command_is_what_ci_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("Install and run the tests", 1)[1]
    readme_command = re.search(r"```sh\n(.+?)\n```", section, re.S)
    assert readme_command, "no test command block after 'Install and run the tests'"
    ci = [line for line in (ROOT / ".ci/run").read_text().splitlines() if line.strip()]
    assert ci[-1] == readme_command.group(1)
    assert "scripts/install-browser" in ci[-1]  # the console's browser test needs it in CI
