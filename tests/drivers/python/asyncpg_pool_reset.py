"""asyncpg's Pool and its reset at every release (issue 9), run by tests/it/pool_reset.rs.

A pool of CONNECTIONS connections, each opened with `server_settings` (startup parameters);
as many tasks, each doing CYCLES cycles of acquire, SET, query, release concurrently. At every
release asyncpg sends `SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL;`.
Every acquire shows the settings the connection has then. The output is the same whoever runs
it, on PostgreSQL directly or through pgvigil (the test compares both): one line per task,
sorted, then the reset string asyncpg sent. Exit status 1 on any error.

The connection comes from the PG* environment variables (libpq's), as for the driver matrix.
"""

import asyncio
import sys

import asyncpg

CONNECTIONS = 6
CYCLES = 5
#: Startup parameters of every connection.
SERVER_SETTINGS = {"application_name": "pool-reset-app", "statement_timeout": "7s"}
#: Bound on one acquire, statement or release, generous for a loaded machine.
TIMEOUT = 30


async def settings(con):
    """The settings the test watches, as one string."""
    return await con.fetchval(
        "SELECT current_setting('application_name') || ' '"
        " || current_setting('statement_timeout') || ' ' || current_setting('work_mem')",
        timeout=TIMEOUT,
    )


async def task(pool, n):
    """CYCLES cycles; returns what every acquire and every SET showed."""
    seen = []
    for cycle in range(CYCLES):
        async with pool.acquire(timeout=TIMEOUT) as con:
            seen.append(f"acquired: {await settings(con)}")
            # One statement per string: a string of several SETs pins a session in pgvigil.
            for sql in (
                f"SET work_mem = '{n + cycle + 1}MB'",
                f"SET application_name = 'task{n}'",
                "SET statement_timeout = '9s'",
            ):
                await con.execute(sql, timeout=TIMEOUT)
            seen.append(f"set: {await settings(con)}")
    return f"task {n}: " + " | ".join(seen)


async def main():
    pool = await asyncpg.create_pool(
        min_size=CONNECTIONS,
        max_size=CONNECTIONS,
        server_settings=SERVER_SETTINGS,
        timeout=TIMEOUT,
    )
    try:
        async with pool.acquire(timeout=TIMEOUT) as con:
            reset = con.get_reset_query()
        lines = await asyncio.gather(*(task(pool, n) for n in range(CONNECTIONS)))
    finally:
        await pool.close()
    for line in sorted(lines):
        print(line)
    print(f"reset query: {reset!r}")


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except Exception as error:  # any failure is the test's failure, with its reason
        print(f"FAIL: {type(error).__name__}: {error}")
        sys.exit(1)
