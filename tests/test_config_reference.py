"""README's configuration table is exactly what `fhirbridge config reference` generates from
Settings: a setting added, renamed or re-described without regenerating it fails here."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from fhirbridge.cli import main
from fhirbridge.configref import FACTORY_DEFAULTS, markdown_table, readme_section
from fhirbridge.settings import Settings

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_table_is_the_generated_one() -> None:
    assert readme_section(README.read_text(encoding="utf-8")) == markdown_table(), (
        "README.md's configuration table is stale: replace it with the output of "
        "`fhirbridge config reference`"
    )


def test_the_command_prints_the_table() -> None:
    result = CliRunner().invoke(main, ["config", "reference"])
    assert result.exit_code == 0, result.output
    assert result.stdout == markdown_table()


def test_every_setting_has_one_row_with_its_description() -> None:
    rows = markdown_table().splitlines()[2:]
    assert [row.split(" | ")[0] for row in rows] == [
        f"| `FHIRBRIDGE_{name.upper()}`" for name in Settings.model_fields
    ]
    for row, field in zip(rows, Settings.model_fields.values(), strict=True):
        assert field.description
        assert row.endswith(f" | {' '.join(field.description.split())} |")


def test_computed_defaults_are_described_for_people() -> None:
    computed = {n for n, f in Settings.model_fields.items() if f.default_factory is not None}
    assert computed == set(FACTORY_DEFAULTS)
    table = markdown_table()
    assert "| `FHIRBRIDGE_DATABASE_URL` | `sqlite:///./fhirbridge.db` (in the working" in table
    assert "| `FHIRBRIDGE_DB_AUTO_UPGRADE` | `false` |" in table
    assert '| `FHIRBRIDGE_AUTH_JWT_ALGORITHMS` | `["RS256", "ES256"]` |' in table
    assert "| `FHIRBRIDGE_WORKER_IDLE_SECONDS` | `1` |" in table


def test_readme_without_markers_is_reported() -> None:
    with pytest.raises(ValueError, match="no config-reference markers"):
        readme_section("# a README without the table\n")
