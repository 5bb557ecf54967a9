"""
An asyncio application on AsyncHealingConnection.

    DATABASE_URL=postgresql://... python examples/async_app.py
"""

import asyncio
import os

from selfheal import AsyncHealingConnection


async def main() -> None:
    dsn = os.environ["DATABASE_URL"]
    async with await AsyncHealingConnection.connect(dsn, autocommit=True) as aconn:
        await aconn.execute("DROP TABLE IF EXISTS example_events")
        await aconn.execute("CREATE TABLE example_events (id bigserial PRIMARY KEY, kind text)")
        await aconn.execute("INSERT INTO example_events (id, kind) SELECT g, 'import'"
                            " FROM generate_series(1, 100) g")
        cur = await aconn.execute(
            "INSERT INTO example_events (kind) VALUES (%s) RETURNING id", ("signup",)
        )
        row = await cur.fetchone()
        print(f"inserted event {row[0]}")


asyncio.run(main())
