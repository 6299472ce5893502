"""The benchmark command keeps working: `python -m bench.run --smoke` runs every section on
tiny sizes and writes its JSON report. Figures are not asserted (they depend on the machine:
targets live in the benchmark, not in timed tests); that each section measured something is."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.fhir_server import sekmet_installed

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.integration
def test_benchmark_runs_every_section(tmp_path: Path) -> None:
    if not sekmet_installed():
        reason = "sekmet-fhir is not installed (the sync and worker sections need it)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    out = tmp_path / "latest.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.run", "--smoke", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    sections = {row["section"] for row in report["rows"]}
    assert sections == {"pipeline", "api", "sync", "cold start", "scaling", "memory"}
    for row in report["rows"]:
        assert row["median"] > 0, row["name"]
        if row["ratio_median"] is not None:
            assert row["ratio_median"] > 0, row["name"]
    assert "| pipeline" in done.stdout and report["machine"]["cores"]
