"""Properties under random interleavings (hypothesis).

Explicit-id inserts, default inserts through HealingConnection, deletes and
resync calls, in random order, while another session keeps inserting:

- the sequence's next value never decreases;
- every default insert that reported success is in the table exactly once
  (unless a delete removed it);
- the session running the operations never sees an error; the concurrent
  writer only when an explicit insert landed on the value its retry drew,
  at most once per explicit insert;
- after a final resync, check reports everything in sync.
"""

from __future__ import annotations

import itertools
import threading

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import selfheal
from selfheal import HealingConnection

from .conftest import seq_next

operations = st.lists(
    st.one_of(
        st.tuples(st.just("explicit"), st.integers(0, 40)),  # an id ahead of the sequence
        st.tuples(st.just("default"), st.just(0)),
        st.tuples(st.just("delete"), st.integers(0, 1000)),  # the n-th row, cyclically
        st.tuples(st.just("resync"), st.just(0)),
    ),
    min_size=1,
    max_size=25,
)


@pytest.mark.timeout(300)
@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=operations)
def test_random_interleavings(conn: psycopg.Connection, dsn: str,
                              ops: list[tuple[str, int]]) -> None:
    """Monotonic sequence, every reported insert present exactly once, in sync at the end."""
    conn.execute("DROP TABLE IF EXISTS prop")
    conn.execute("CREATE TABLE prop (id serial PRIMARY KEY, marker text UNIQUE)")
    markers = (f"m{i}" for i in itertools.count())
    reported: list[str] = []
    deleted: set[str] = set()
    stop = threading.Event()
    background: list[str] = []
    bg_collisions: list[str] = []
    bg_errors: list[BaseException] = []

    def writer() -> None:
        try:
            with HealingConnection.connect(dsn, autocommit=True) as bg:
                n = 0
                while not stop.is_set():
                    marker = f"bg{n}"
                    n += 1
                    try:
                        bg.execute("INSERT INTO prop (marker) VALUES (%s)", (marker,))
                    except psycopg.errors.UniqueViolation:
                        bg_collisions.append(marker)  # raced an explicit insert
                    else:
                        background.append(marker)
        except BaseException as ex:
            bg_errors.append(ex)

    thread = threading.Thread(target=writer)
    thread.start()
    last = seq_next(conn, "public.prop_id_seq")
    try:
        with HealingConnection.connect(dsn, autocommit=True) as hc:
            for op, arg in ops:
                if op == "explicit":
                    conn.execute(
                        "INSERT INTO prop (id) VALUES (%s) ON CONFLICT DO NOTHING",
                        (seq_next(conn, "public.prop_id_seq") + arg,),
                    )
                elif op == "default":
                    marker = next(markers)
                    hc.execute("INSERT INTO prop (marker) VALUES (%s)", (marker,))
                    reported.append(marker)
                elif op == "delete":
                    row = conn.execute(
                        "DELETE FROM prop WHERE id = (SELECT id FROM prop ORDER BY id"
                        " OFFSET %s %% greatest((SELECT count(*) FROM prop), 1) LIMIT 1)"
                        " RETURNING marker", (arg,)
                    ).fetchone()
                    if row is not None and row[0] is not None:
                        deleted.add(row[0])
                else:
                    selfheal.resync(conn, "prop")
                now = seq_next(conn, "public.prop_id_seq")
                assert now >= last, f"sequence moved backwards after {op}: {last} -> {now}"
                last = now
    finally:
        stop.set()
        thread.join()

    assert bg_errors == []
    assert len(bg_collisions) <= sum(1 for op, _ in ops if op == "explicit")
    counts = dict(conn.execute(
        "SELECT marker, count(*) FROM prop WHERE marker IS NOT NULL GROUP BY marker"
    ).fetchall())
    for marker in reported + background:
        assert counts.get(marker, 0) == (0 if marker in deleted else 1), marker
    assert all(counts.get(marker, 0) == 0 for marker in bg_collisions)
    selfheal.resync(conn, "prop")
    assert all(s.in_sync for s in selfheal.check(conn))
