"""`selfheal.testing`: the assertion teams put after their seeders."""

from __future__ import annotations

import psycopg
import pytest

from selfheal.testing import aassert_sequences_in_sync, assert_sequences_in_sync

from .tenants import seed


class TestAssertSequencesInSync:
    def test_passes_when_in_sync(self, conn: psycopg.Connection) -> None:
        """No error when every sequence is past its keys (empty tables included)."""
        seed(conn, users=0)
        conn.execute("INSERT INTO users (name) VALUES ('drawn from the sequence')")
        assert_sequences_in_sync(conn)

    def test_fails_listing_drifted_tables(self, conn: psycopg.Connection) -> None:
        """AssertionError names each drifted table, its next value and its highest key."""
        seed(conn, users=12, orders=3)
        with pytest.raises(AssertionError) as info:
            assert_sequences_in_sync(conn)
        message = str(info.value)
        assert message.startswith("2 sequences behind the table's keys")
        assert "public.users.id: next value 1, highest key 12 (sequence public.users_id_seq)" \
            in message
        assert "public.orders.id: next value 1, highest key 3" in message
        assert "items" not in message
        assert "selfheal.resync(conn, table)" in message

    def test_off_by_one_fails(self, conn: psycopg.Connection) -> None:
        """A seeder's setval(seq, max(id), false) leaves a collision and fails the assertion."""
        seed(conn, users=5)
        conn.execute("SELECT setval('users_id_seq', 5, false)")
        with pytest.raises(AssertionError, match="next value 5, highest key 5"):
            assert_sequences_in_sync(conn)
        conn.execute("SELECT setval('users_id_seq', 5, true)")
        assert_sequences_in_sync(conn)

    def test_inside_test_transaction(self, dsn: str) -> None:
        """Uncommitted seed rows are seen, and the transaction is left open and usable."""
        with psycopg.connect(dsn) as tx:
            seed(tx, users=4)
            with pytest.raises(AssertionError, match=r"public\.users\.id"):
                assert_sequences_in_sync(tx)
            assert tx.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
            assert tx.execute("SELECT count(*) FROM users").fetchone() == (4,)
            tx.rollback()

    def test_schema_and_tables(self, conn: psycopg.Connection) -> None:
        """schema and tables narrow what is asserted."""
        seed(conn, "tenant_a", users=3)
        seed(conn, "public", users=0)
        assert_sequences_in_sync(conn, "public")
        assert_sequences_in_sync(conn, tables=["orders"])
        with pytest.raises(AssertionError, match="1 sequence behind"):
            assert_sequences_in_sync(conn, "tenant%")

    async def test_async_twin(self, aconn: psycopg.AsyncConnection) -> None:
        """The async twin passes and fails as the sync one does."""
        await aconn.execute("CREATE TABLE t (id serial PRIMARY KEY)")
        await aassert_sequences_in_sync(aconn)
        await aconn.execute("INSERT INTO t (id) VALUES (7)")
        with pytest.raises(AssertionError, match=r"public\.t\.id: next value 1, highest key 7"):
            await aassert_sequences_in_sync(aconn)
