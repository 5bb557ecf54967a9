"""The architecture the file list promises: one core that knows no driver, shells around it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "selfheal"

#: What decides and does the work, for every driver alike.
CORE = ["_ops", "_sqltext", "detect", "discover", "errors", "explicit", "heal", "insync",
        "names", "protect", "report", "resync", "sentry"]

#: What the core may take from psycopg: SQL composition, libpq's constants, row types.
PSYCOPG_ALLOWED = {"psycopg.sql", "psycopg.pq", "psycopg.rows"}

#: Drivers and the shells that serve the core on them.
SHELLS = {"_attempt", "_drive", "_shell", "api", "asyncpg", "psycopg2", "sqlalchemy", "wrap",
          "django", "fleet", "guardfleet", "cli"}


def imports_of(module: str) -> set[str]:
    """Every name `module` imports, anywhere in it, as a dotted path from its package."""
    found: set[str] = set()
    for node in ast.walk(ast.parse((PACKAGE / f"{module}.py").read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = "selfheal" + (f".{base}" if base else "")
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


@pytest.mark.parametrize("module", CORE)
def test_core_imports_no_driver(module: str) -> None:
    """A core module imports no driver (psycopg beyond SQL composition and constants,
    psycopg2, asyncpg, an ORM) and none of selfheal's driver shells."""
    for name in imports_of(module):
        top = name.split(".")[0]
        assert top not in ("psycopg2", "asyncpg", "sqlalchemy", "django"), name
        if top == "psycopg":
            assert ".".join(name.split(".")[:2]) in PSYCOPG_ALLOWED, name
        if top == "selfheal":
            assert name.split(".")[1] not in SHELLS, name


def test_report_and_sentry_do_not_import_each_other() -> None:
    """Reporting uses the Sentry settings; the settings know nothing of reporting."""
    assert any(name.startswith("selfheal.sentry.") for name in imports_of("report"))
    assert not any(name.startswith("selfheal") for name in imports_of("sentry"))
