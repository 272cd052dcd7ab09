"""The README stays true: its two commands, its settings table and the CI's test command."""

from __future__ import annotations

import re
from pathlib import Path

from interscope_server.config import Settings

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
TEST_COMMAND = "bash scripts/setup.sh && .venv/bin/python -m pytest"
DEMO_COMMAND = "bash scripts/setup.sh && .venv/bin/interscope demo"


def test_readme_documents_every_setting_and_no_other() -> None:
    documented = set(re.findall(r"^\| `INTERSCOPE_([A-Z_]+)` \|", README, flags=re.MULTILINE))
    assert documented == {name.upper() for name in Settings.model_fields}


def test_the_two_commands_are_in_the_readme_and_ci_runs_both_as_written() -> None:
    assert DEMO_COMMAND in README and TEST_COMMAND in README
    ci = (ROOT / ".ci" / "run").read_text()
    assert f"DEMO_COMMAND='{DEMO_COMMAND}'" in ci and f"TEST_COMMAND='{TEST_COMMAND}'" in ci
