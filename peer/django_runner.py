"""
Django's DiscoverRunner, recording every test's outcome to ``$PEER_RESULTS``.

With ``--parallel`` the workers' events are replayed on the result of the
main process, so recording there sees every test.
"""

from __future__ import annotations

import os
import unittest
from collections import Counter
from pathlib import Path
from typing import Any

from django.test.runner import DiscoverRunner

from .outcomes import class_name, merge, save

_outcomes: dict[str, str] = {}
_connections: Counter[str] = Counter()


class RecordingResult(unittest.TextTestResult):
    """The usual text result that also notes each test's outcome."""

    def addSuccess(self, test: Any) -> None:
        super().addSuccess(test)
        merge(_outcomes, test.id(), "passed")

    def addFailure(self, test: Any, err: Any) -> None:
        super().addFailure(test, err)
        merge(_outcomes, test.id(), "failed")

    def addError(self, test: Any, err: Any) -> None:
        # Also class- and module-level errors (setUpClass): their id names them.
        super().addError(test, err)
        merge(_outcomes, test.id(), "failed")

    def addSkip(self, test: Any, reason: str) -> None:
        super().addSkip(test, reason)
        merge(_outcomes, test.id(), "skipped")

    def addExpectedFailure(self, test: Any, err: Any) -> None:
        super().addExpectedFailure(test, err)
        merge(_outcomes, test.id(), "xfail")

    def addUnexpectedSuccess(self, test: Any) -> None:
        super().addUnexpectedSuccess(test)
        merge(_outcomes, test.id(), "failed")

    def addSubTest(self, test: Any, subtest: Any, err: Any) -> None:
        super().addSubTest(test, subtest, err)
        if err is not None:
            merge(_outcomes, test.id(), "failed")


class RecordingRunner(DiscoverRunner):
    """DiscoverRunner with `RecordingResult`; writes the outcomes when the suite ends."""

    def get_resultclass(self) -> type[unittest.TextTestResult]:
        return RecordingResult

    def setup_databases(self, **kwargs: Any) -> Any:
        # Django opens connections in each worker too; one per database the
        # suite uses, opened here, shows which backend class is in use.
        old_config = super().setup_databases(**kwargs)
        for conn, _old_name, _destroy in old_config:
            conn.ensure_connection()
            _connections[class_name(conn.connection)] += 1
        return old_config

    def suite_result(self, suite: Any, result: Any, **kwargs: Any) -> int:
        save(Path(os.environ["PEER_RESULTS"]), _outcomes, _connections)
        failures: int = super().suite_result(suite, result, **kwargs)
        return failures
