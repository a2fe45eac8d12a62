"""The README's configuration table follows from the settings' declarations.

Each setting is declared once, in ``service/config.py``; the README shows the
table :func:`configuration_table` renders from those declarations, so a
variable added, renamed or removed there without the README fails here.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from service.config import Settings, configuration_table, configuration_variables

README = Path(__file__).resolve().parent.parent / "README.md"
# The variable a table row documents: its first cell starts with it, in backticks.
ROW_VARIABLE = re.compile(r"^\| `([A-Z][A-Z0-9_]*)`", re.MULTILINE)


def configuration_section() -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index("\n## Configuration\n")
    end = text.find("\n## ", start + 1)
    return text[start:] if end < 0 else text[start:end]


def test_the_readme_documents_every_variable_and_no_other() -> None:
    documented = ROW_VARIABLE.findall(configuration_section())
    declared = configuration_variables()
    assert sorted(set(declared) - set(documented)) == [], "missing from README.md"
    assert sorted(set(documented) - set(declared)) == [], "in README.md but not a setting"
    assert len(documented) == len(set(documented)), "documented twice"


def test_the_readme_shows_the_rendered_table() -> None:
    assert configuration_table() in configuration_section(), (
        "paste the output of service.config.configuration_table() into README.md"
    )


def test_every_field_is_the_variable_of_its_name() -> None:
    # As the README says: PORT sets `port`.
    fields = [field.name for field in dataclasses.fields(Settings)]
    assert [variable.lower() for variable in configuration_variables()] == fields


def test_every_row_has_three_cells() -> None:
    # A "|" in a line of documentation would split its row.
    for row in configuration_table().splitlines():
        assert row.count("|") == 4, row


def test_an_empty_environment_gives_the_declared_defaults() -> None:
    assert Settings.from_env({}, serving=False) == Settings()
