"""
Render: a fleet report as people and machines read it.

A table (the sequences that need attention, and a summary line), a JSON array
(one object per sequence, per unreadable table and per failed database), and
OpenMetrics gauges for a Prometheus textfile collector. Shared by ``selfheal``
and the Django management commands, so both print the same.
"""

from __future__ import annotations

import json
import time
from typing import Any

from . import fleet
from .fleet import FleetReport, SequenceReport

__all__ = ["render_json", "render_openmetrics", "render_table"]


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _summary(report: FleetReport) -> str:
    seqs = report.sequences
    behind = [s for s in seqs if not s.in_sync and s.error is None]
    failed = report.failed
    head = (f"{report.command}: {_plural(len(seqs), 'sequence')} in"
            f" {_plural(len(report.databases), 'database')} ({report.elapsed:.2f} s)")
    parts: list[str] = []
    if report.command == "fix" and not report.dry_run:
        moved = [s for s in seqs if s.changed]
        if moved:
            dbs = {s.database for s in moved}
            parts.append(f"moved {len(moved)} in {_plural(len(dbs), 'database')}")
    if behind:
        dbs = {s.database for s in behind}
        verb = "would move" if report.dry_run else "behind"
        parts.append(f"{len(behind)} {verb} in {_plural(len(dbs), 'database')}")
    if failed:
        parts.append(f"{_plural(len(failed), 'database')} failed")
    if not behind and not failed:
        parts.append("all in sync")
    if report.dry_run:
        parts.append("nothing changed (dry run)")
    return f"{head}: {', '.join(parts)}"


def _state(seq: SequenceReport, dry_run: bool) -> str:
    if seq.error is not None:
        return f"error: {seq.error}"
    if seq.changed:
        return "moved"
    if seq.in_sync:
        return "in sync"
    behind = f"behind by {fleet.gap(seq.found)}"
    return f"{behind}, would move" if dry_run else behind


def render_table(report: FleetReport, verbose: bool = False) -> str:
    """An aligned, readable table of what needs attention, and a summary line."""
    fix = report.command == "fix"
    header = ["DATABASE", "TABLE", "KEY MAX", "BEFORE" if fix else "NEXT"]
    header += ["AFTER", "STATUS"] if fix else ["STATUS"]
    rows: list[list[str]] = []
    for db in report.databases:
        if db.error is not None:
            rows.append([db.target.name, "-", "", ""] + ([""] if fix else [])
                        + [f"error: {db.error}"])
            continue
        for schema, table, why in db.unreadable:
            rows.append([db.target.name, f"{schema}.{table}", "", ""] + ([""] if fix else [])
                        + [f"error: {why}"])
        for seq in db.sequences:
            if not (verbose or seq.changed or not seq.in_sync):
                continue
            found = seq.found
            key = found.max_value if found.increment > 0 else found.min_value
            row = [seq.database, f"{found.schema}.{found.table}",
                   "" if key is None else str(key), str(found.next_value)]
            if fix:
                # A dry run shows where the sequence would go.
                row.append(str(seq.move_to if report.dry_run else seq.status.next_value))
            row.append(_state(seq, report.dry_run))
            rows.append(row)
    lines: list[str] = []
    if rows:
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
        numeric = {2, 3, 4} if fix else {2, 3}
        for row in [header, *rows]:
            cells = [
                (cell.rjust(w) if i in numeric else cell.ljust(w))
                for i, (cell, w) in enumerate(zip(row, widths, strict=False))
            ]
            lines.append("  ".join([*cells, row[-1]]).rstrip())
    lines.append(_summary(report))
    return "\n".join(lines) + "\n"


def render_json(report: FleetReport) -> str:
    """A JSON array: one object per sequence, and one per database that failed."""
    items: list[dict[str, Any]] = []
    for db in report.databases:
        if db.error is not None:
            items.append({"database": db.target.name, "error": db.error})
        items += [{"database": db.target.name, "schema": schema, "table": table, "error": why}
                  for schema, table, why in db.unreadable]
        items += [s.as_dict(fix=report.command == "fix", dry_run=report.dry_run)
                  for s in db.sequences]
    return json.dumps(items, indent=2) + "\n"


def _label(value: str) -> str:
    # Exposition format: backslash, double quote and newline are escaped.
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(**labels: str) -> str:
    return "{" + ",".join(f'{k}="{_label(v)}"' for k, v in labels.items()) + "}"


def render_openmetrics(report: FleetReport, now: float | None = None) -> str:
    """Drift gauges in the OpenMetrics text format, for a Prometheus textfile collector."""
    out: list[str] = []

    def family(name: str, help_: str, samples: list[tuple[str, float | int]]) -> None:
        out.append(f"# HELP {name} {help_}")
        out.append(f"# TYPE {name} gauge")
        out.extend(f"{name}{labels} {value}" for labels, value in samples)

    seqs = [s for db in report.databases if db.error is None for s in db.sequences]

    def seq_labels(s: SequenceReport) -> str:
        return _labels(database=s.database, schema=s.found.schema, table=s.found.table)

    family("selfheal_sequence_in_sync",
           "1 when the sequence's next value lies past every key of its table.",
           [(seq_labels(s), int(s.in_sync)) for s in seqs])
    family("selfheal_sequence_gap",
           "Values the sequence must advance to pass its table's keys; 0 when in sync.",
           [(seq_labels(s), 0 if s.in_sync else fleet.gap(s.status)) for s in seqs])
    family("selfheal_database_up",
           "1 when the database could be checked, 0 when it failed.",
           [(_labels(database=db.target.name), int(not db.failed)) for db in report.databases])
    family("selfheal_last_run_timestamp_seconds",
           "When selfheal last wrote these metrics.",
           [("", round(time.time() if now is None else now, 3))])
    out.append("# EOF")
    return "\n".join(out) + "\n"
