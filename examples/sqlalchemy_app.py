"""
A SQLAlchemy 2 application with selfheal: one line per engine.

    DATABASE_URL=postgresql+psycopg://app@localhost/shop python examples/sqlalchemy_app.py

Creates tables whose id sequence lags (rows inserted with explicit ids, as an
import or a restore does), then writes through the ORM, a savepoint, a
bulk insert and an asyncio session: each heals the sequence and succeeds
instead of failing with a duplicate key.
"""

import asyncio
import os

from sqlalchemy import Engine, String, create_engine, make_url, text
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import selfheal.sqlalchemy


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "example_items"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))


class AuditEntry(Base):
    __tablename__ = "example_audit"
    id: Mapped[int] = mapped_column(primary_key=True)
    message: Mapped[str]


def import_rows(engine: Engine, first: int, last: int) -> None:
    """What an import or a restore does: rows with explicit ids, the sequence left behind."""
    with engine.begin() as conn:
        conn.execute(
            text("INSERT INTO example_items (id, name) SELECT g, 'imported'"
                 " FROM generate_series(CAST(:first AS int), CAST(:last AS int)) g"),
            {"first": first, "last": last},
        )


url = make_url(os.environ["DATABASE_URL"])
if url.drivername in ("postgresql", "postgres"):
    url = url.set(drivername="postgresql+psycopg")  # selfheal needs psycopg 3

# The one line: connections this engine opens heal lagging sequences.
engine = selfheal.sqlalchemy.install(create_engine(url, insertmanyvalues_page_size=5))
# The import runs elsewhere, through a plain engine (a healing one would move
# the sequence right after it: see explicit_ids in the README).
importer = create_engine(url)

Base.metadata.drop_all(engine)
Base.metadata.create_all(engine)
import_rows(importer, 1, 3)

with Session(engine) as session:
    book = Item(name="book")
    session.add(book)
    session.commit()  # without selfheal: IntegrityError, duplicate key (id)=(1)
    print(f"added book {book.id}")

import_rows(importer, 5, 6)
with Session(engine) as session:
    session.add(AuditEntry(message="pen requested"))
    session.flush()
    with session.begin_nested():  # a savepoint, as usual
        pen = Item(name="pen")
        session.add(pen)
    session.commit()  # the audit entry is kept: the heal did not roll it back
    print(f"added pen {pen.id} in a savepoint, after the audit entry")

import_rows(importer, 8, 50)
with Session(engine) as session:
    items = [Item(name=f"bulk {i}") for i in range(10)]
    session.add_all(items)  # insertmanyvalues: two INSERT statements of five rows
    session.commit()
    ids = sorted(item.id for item in items)
    print(f"bulk-inserted {len(items)} items, ids {ids[0]}..{ids[-1]}")
engine.dispose()


async def main() -> None:
    # The same line for asyncio engines.
    aengine = selfheal.sqlalchemy.install(create_async_engine(url))
    import_rows(importer, 61, 62)
    async with AsyncSession(aengine, expire_on_commit=False) as session:
        lamp = Item(name="lamp")
        session.add(lamp)
        await session.commit()
        print(f"asyncio: added lamp {lamp.id}")
    await aengine.dispose()


asyncio.run(main())
importer.dispose()
