"""
``make peer``: the frameworks' own suites, plain and through selfheal; fail on a regression.

    python -m peer.run [--suite NAME ...] [--full] [--jobs N]

A regression is a test that passes plain and does not pass through selfheal
(fails, errors, is skipped or is missing), again when re-run alone through
selfheal (one that passes then is listed as flaky). Differences that are
selfheal's design are listed in peer/expected.py and reported apart. Tests
that fail in both runs are counted, not judged: they depend on the server
(no ICU collations, no prepared transactions) or on the machine. Each run's
output is kept in ``.peer/logs/``, its per-test outcomes in ``.peer/results/``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from . import sdist, server, suites
from .expected import reason
from .outcomes import PASSED, Comparison, load

CACHE = suites.ROOT / ".peer"


def _run_one(suite: suites.Suite, src: Path, dsn: str, mode: str, args: argparse.Namespace,
             only: list[str] | None = None) -> tuple[Path, float]:
    label = f"{mode}-rerun" if only else mode
    results = CACHE / "results" / f"{suite.name}-{label}.json"
    log = CACHE / "logs" / f"{suite.name}-{label}.log"
    for path in (results, log):
        path.parent.mkdir(parents=True, exist_ok=True)
    results.unlink(missing_ok=True)
    jobs = 1 if only else args.jobs
    if suite.name == "django":
        run = suites.django(src, dsn, mode, results, jobs, only)
    else:
        run = suites.sqlalchemy(src, dsn, mode, results, jobs, only=only,
                                driver=suites.SQLALCHEMY_DRIVERS[suite.name], full=args.full)
    print(f"peer: {suite.name} {label} ... ", end="", flush=True)
    start = time.monotonic()
    try:
        with log.open("w") as out:
            # Failing tests make the exit code non-zero in both runs: the
            # outcomes decide, and a run that wrote none is an error below.
            subprocess.run(run.cmd, cwd=run.cwd, env=run.env, stdout=out,
                           stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, check=False)
    finally:
        for name in run.databases:
            server.drop_database(dsn, name)
    elapsed = time.monotonic() - start
    print(f"{elapsed:.0f} s", flush=True)
    return results, elapsed


def _check_connections(suite: str, mode: str, counts: Counter[str]) -> list[str]:
    """What is wrong with the connections a run opened: healing ones iff `mode` is selfheal.

    A few plain connections in a selfheal run are the tests that make their
    own (see expected.py); a run that opened no healing one did not heal.
    """
    healing = sum(n for cls, n in counts.items() if cls.startswith("selfheal."))
    if not counts:
        return [f"{suite} {mode}: no connection recorded"]
    if mode == "selfheal" and not healing:
        return [f"{suite} selfheal: no healing connection, only {dict(counts)}"]
    if mode == "plain" and healing:
        return [f"{suite} plain: {healing} healing connection(s)"]
    return []


def _unexpected(c: Comparison) -> list[str]:
    if not c.plain or not c.healed:
        return []  # reported as an error: no comparison to list
    return [t for t in c.regressions if not reason(c.suite, t)]


def _report(comparisons: list[Comparison], times: dict[str, float],
            connections: dict[str, Counter[str]], reruns: dict[str, dict[str, str]]) -> int:
    """Print the table and the lists; return the number of regressions confirmed by a re-run."""
    header = (f"{'suite':<20} {'run':>6} {'passed plain':>13} {'passed selfheal':>16}"
              f" {'failed both':>12} {'regressions':>12} {'expected':>9} {'time':>6}")
    print("\n" + header)
    unexpected_total = 0
    details = []
    for c in comparisons:
        expected = [t for t in c.regressions if reason(c.suite, t)]
        rerun = reruns.get(c.suite, {})
        flaky = [t for t in _unexpected(c) if rerun.get(t) in PASSED]
        unexpected = [t for t in _unexpected(c) if t not in flaky]
        unexpected_total += len(unexpected)
        print(f"{c.suite:<20} {c.run:>6} {c.passed_plain:>13} {c.passed_healed:>16}"
              f" {c.failed_both:>12} {len(unexpected):>12} {len(expected):>9}"
              f" {times[c.suite]:>5.0f}s")
        details.append((c, unexpected, expected, flaky))
    for c, unexpected, expected, flaky in details:
        print(f"\n{c.suite}: connections plain {_counts(connections[c.suite + ' plain'])},"
              f" selfheal {_counts(connections[c.suite + ' selfheal'])}")
        if unexpected:
            print(f"{c.suite}: REGRESSIONS, {len(unexpected)} pass plain but not through"
                  f" selfheal (see .peer/logs/{c.suite}-selfheal.log):")
            for test in unexpected:
                print(f"  {test}  [{c.healed.get(test, 'missing')}, again on re-run]")
        if flaky:
            print(f"{c.suite}: {len(flaky)} failed through selfheal but passed when re-run"
                  f" alone (flaky; not counted):")
            for test in flaky:
                print(f"  {test}")
        if expected:
            print(f"{c.suite}: {len(expected)} expected differences (peer/expected.py):")
            for test in expected:
                print(f"  {test}  [{reason(c.suite, test)}]")
        stale = sorted(t for t, o in c.healed.items() if o in PASSED and reason(c.suite, t))
        if stale:
            print(f"{c.suite}: {len(stale)} listed in peer/expected.py pass through selfheal"
                  f" now (take them off the list):")
            for test in stale:
                print(f"  {test}")
        if c.fixed:
            print(f"{c.suite}: {len(c.fixed)} pass only through selfheal (flaky?):")
            for test in c.fixed:
                print(f"  {test}")
    return unexpected_total


def _counts(counts: Counter[str]) -> str:
    return ", ".join(f"{n} {cls}" for cls, n in counts.most_common()) or "none"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m peer.run", description=__doc__.split("\n")[1])
    parser.add_argument("--suite", action="append", choices=[s.name for s in suites.SUITES],
                        help="run only this suite (repeatable)")
    parser.add_argument("--full", action="store_true",
                        help="also the slow SQLAlchemy files left out by default")
    parser.add_argument("--jobs", type=int, default=min(os.cpu_count() or 1, 4),
                        help="test processes per run (default: the cores, at most 4)")
    args = parser.parse_args(argv)
    chosen = [s for s in suites.SUITES if not args.suite or s.name in args.suite]

    sources = {}
    for package in {s.package for s in chosen}:
        sdist.check_installed(*package)
        sources[package] = sdist.unpacked(*package, CACHE)

    start = time.monotonic()
    comparisons, times, problems = [], {}, []
    connections: dict[str, Counter[str]] = {}
    reruns: dict[str, dict[str, str]] = {}
    with server.server() as dsn:
        server.drop_leftovers(dsn)
        for suite in chosen:
            outcomes = {}
            times[suite.name] = 0.0
            for mode in suites.MODES:
                path, elapsed = _run_one(suite, sources[suite.package], dsn, mode, args)
                times[suite.name] += elapsed
                outcomes[mode], counts = load(path)
                connections[f"{suite.name} {mode}"] = counts
                if not outcomes[mode]:
                    problems.append(f"{suite.name} {mode}: no test ran"
                                    f" (see .peer/logs/{suite.name}-{mode}.log)")
                problems += _check_connections(suite.name, mode, counts)
            comparison = Comparison(suite.name, outcomes["plain"], outcomes["selfheal"])
            comparisons.append(comparison)
            if _unexpected(comparison):
                # Tell a regression from a test that is flaky on a loaded machine.
                path, _ = _run_one(suite, sources[suite.package], dsn, "selfheal", args,
                                   only=_unexpected(comparison))
                reruns[suite.name] = load(path)[0]
        server.drop_leftovers(dsn)

    regressions = _report(comparisons, times, connections, reruns)
    print(f"\npeer: {time.monotonic() - start:.0f} s in all")
    for problem in problems:
        print(f"peer: ERROR: {problem}")
    if regressions or problems:
        print(f"peer: FAILED: {regressions} regression(s), {len(problems)} error(s)")
        return 1
    print("peer: OK: no test passes plain and fails through selfheal, beyond those expected")
    return 0

if __name__ == "__main__":
    sys.exit(main())
