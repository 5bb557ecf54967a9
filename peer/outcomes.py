"""
Per-test outcomes, as each suite's recorder writes them and run.py compares them.

A results file is JSON: ``{"connections": {class: count}, "tests": {test id:
outcome}}``, where ``connections`` counts the psycopg connections the suite
opened by class (so a run that meant to go through selfheal shows that it did).
Outcomes are ``passed``, ``failed``, ``skipped`` and ``xfail`` (an expected
failure that failed).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

PASSED = frozenset({"passed", "xfail"})

# When one test is recorded twice (a subtest failed, then the test "passed";
# a teardown error after a pass), the worse outcome stands.
_RANK = {"skipped": 0, "xfail": 1, "passed": 2, "failed": 3}


def merge(outcomes: dict[str, str], test_id: str, outcome: str) -> None:
    """Record `outcome` for `test_id`, keeping the worse of two records."""
    old = outcomes.get(test_id)
    if old is None or _RANK[outcome] > _RANK[old]:
        outcomes[test_id] = outcome


def class_name(obj: object) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def save(path: Path, outcomes: dict[str, str], connections: Counter[str]) -> None:
    path.write_text(json.dumps({"connections": connections, "tests": outcomes},
                               indent=0, sort_keys=True))


def load(path: Path) -> tuple[dict[str, str], Counter[str]]:
    """The outcomes and connection counts in `path`; nothing for a run that wrote none."""
    if not path.exists():
        return {}, Counter()
    data = json.loads(path.read_text())
    return data["tests"], Counter(data["connections"])


@dataclass
class Comparison:
    """One suite's plain run against its selfheal run."""

    suite: str
    plain: dict[str, str]
    healed: dict[str, str]

    @property
    def run(self) -> int:
        return len(self.plain.keys() | self.healed.keys())

    @property
    def passed_plain(self) -> int:
        return sum(o in PASSED for o in self.plain.values())

    @property
    def passed_healed(self) -> int:
        return sum(o in PASSED for o in self.healed.values())

    @property
    def failed_both(self) -> int:
        return sum(
            self.plain.get(t) == "failed" and self.healed.get(t) == "failed"
            for t in self.plain.keys() | self.healed.keys()
        )

    @property
    def regressions(self) -> list[str]:
        """Tests that pass plain but not through selfheal (failed, skipped or missing)."""
        return sorted(t for t, o in self.plain.items()
                      if o in PASSED and self.healed.get(t) not in PASSED)

    @property
    def fixed(self) -> list[str]:
        """Tests that pass only through selfheal (flaky, or order-dependent)."""
        return sorted(t for t, o in self.healed.items()
                      if o in PASSED and self.plain.get(t) not in PASSED)
