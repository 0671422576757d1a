"""asyncpg through pgvigil: one line per check, exit status 1 if any failed (see checks.py).

asyncpg has no pipeline mode of its own to check; its executemany sends every row's
Bind/Execute before one Sync, which the batch check covers.
"""

import asyncio
import io
import time

import asyncpg

from checks import READS, Report, check_reads

#: How long a cancelled statement would sleep: far longer than a cancel may take.
SLEEP = 30
#: Bound on a cancel's effect, generous for a loaded machine.
CANCEL_WITHIN = 10.0


async def connect():
    """A connection through pgvigil, from the PG* environment variables."""
    return await asyncpg.connect(timeout=10)


async def connect_and_query():
    conn = await connect()
    try:
        assert await conn.fetchval("SELECT 1") == 1
        version = conn.get_server_version()
        return f"server {version.major}.{version.micro}"
    finally:
        await conn.close()


async def prepared_past_threshold():
    # asyncpg prepares every statement as a named one and keeps it in its statement cache; the
    # session's reads move between nodes meanwhile.
    conn = await connect()
    try:
        for i in range(15):
            assert await conn.fetchval("SELECT $1::int + 1", i) == i + 1
        statement = await conn.prepare("SELECT $1::text || 'x', inet_server_port()")
        for i in range(15):
            row = await statement.fetchrow(str(i))
            assert row[0] == f"{i}x", row
        return "15 runs from the statement cache, 15 of an explicit prepare"
    finally:
        await conn.close()


async def batch():
    conn = await connect()
    try:
        await conn.execute("DROP TABLE IF EXISTS asyncpg_batch")
        await conn.execute("CREATE TABLE asyncpg_batch (id int PRIMARY KEY, name text)")
        await conn.executemany(
            "INSERT INTO asyncpg_batch VALUES ($1, $2)",
            [(i, f"n{i}") for i in range(500)],
        )
        count = await conn.fetchval("SELECT count(*) FROM asyncpg_batch")
        assert count == 500, count
        return "executemany of 500 rows"
    finally:
        await conn.close()


async def transaction_error_then_rollback():
    conn = await connect()
    try:
        await conn.execute("DROP TABLE IF EXISTS asyncpg_tx")
        await conn.execute("CREATE TABLE asyncpg_tx (id int)")
        try:
            async with conn.transaction():
                await conn.execute("INSERT INTO asyncpg_tx VALUES (1)")
                await conn.execute("SELECT 1 / 0")
        except asyncpg.DivisionByZeroError:
            pass
        else:
            raise AssertionError("1 / 0 did not fail")
        count = await conn.fetchval("SELECT count(*) FROM asyncpg_tx")
        assert count == 0, f"the rolled back row is there ({count})"
    finally:
        await conn.close()


async def copy_in_and_out():
    conn = await connect()
    try:
        await conn.execute("DROP TABLE IF EXISTS asyncpg_copy")
        await conn.execute("CREATE TABLE asyncpg_copy (id int, name text)")
        # copy_records_to_table sends binary COPY data.
        await conn.copy_records_to_table(
            "asyncpg_copy", records=[(i, f"n{i}") for i in range(1000)], columns=["id", "name"]
        )
        text = io.StringIO("".join(f"{i}\ttext {i}\n" for i in range(1000, 2000)))
        await conn.copy_to_table("asyncpg_copy", source=io.BytesIO(text.getvalue().encode()))
        out = io.BytesIO()
        await conn.copy_from_query("SELECT id, name FROM asyncpg_copy ORDER BY id", output=out)
        lines = out.getvalue().decode().splitlines()
        assert len(lines) == 2000, len(lines)
        assert lines[1500] == "1500\ttext 1500", lines[1500]
        return "2000 rows in (binary and text) and out"
    finally:
        await conn.close()


async def listen_notify():
    listener = await connect()
    notifier = await connect()
    try:
        got = asyncio.get_running_loop().create_future()
        await listener.add_listener(
            "asyncpg_channel", lambda _c, _pid, _chan, payload: got.set_result(payload)
        )
        await notifier.execute("NOTIFY asyncpg_channel, 'hello'")
        payload = await asyncio.wait_for(got, timeout=10)
        assert payload == "hello", payload
    finally:
        await listener.close()
        await notifier.close()


async def cancel():
    # On a timeout asyncpg sends a CancelRequest and waits for the statement to end.
    conn = await connect()
    try:
        started = time.monotonic()
        try:
            await conn.fetchval(f"SELECT pg_sleep({SLEEP})", timeout=0.5)
        except asyncio.TimeoutError:
            pass
        else:
            raise AssertionError("the sleep was not cancelled")
        waited = time.monotonic() - started
        assert waited < CANCEL_WITHIN, f"cancelled only after {waited:.1f} s"
        assert await conn.fetchval("SELECT 1") == 1
        return f"cancelled {waited * 1000 - 500:.0f} ms after the timeout"
    finally:
        await conn.close()


async def cursor_with_fetch_size():
    # A cursor is a portal run 10 rows per Execute.
    conn = await connect()
    try:
        async with conn.transaction():
            total = 0
            async for row in conn.cursor("SELECT g FROM generate_series(1, 1000) AS g", prefetch=10):
                total += row[0]
            cursor = await conn.cursor("SELECT g FROM generate_series(1, 100) AS g")
            first = await cursor.fetch(10)
        assert total == 500500, total
        assert [r[0] for r in first] == list(range(1, 11)), first
        return "1000 rows, 10 per fetch"
    finally:
        await conn.close()


async def reads_on_a_fresh_connection():
    conn = await connect()
    try:
        ports = [await conn.fetchval("SELECT inet_server_port()") for _ in range(READS)]
        return check_reads(ports)
    finally:
        await conn.close()


async def read_only_transactions():
    conn = await connect()
    try:
        ports = []
        for _ in range(READS):
            async with conn.transaction(readonly=True):
                ports.append(await conn.fetchval("SELECT inet_server_port()"))
        return check_reads(ports)
    finally:
        await conn.close()


async def main():
    report = Report("asyncpg", asyncpg.__version__)
    await report.check_async("connect", connect_and_query)
    await report.check_async("prepared_past_threshold", prepared_past_threshold)
    await report.check_async("batch", batch)
    await report.check_async("transaction_error_then_rollback", transaction_error_then_rollback)
    await report.check_async("copy_in_and_out", copy_in_and_out)
    await report.check_async("listen_notify", listen_notify)
    await report.check_async("cancel", cancel)
    await report.check_async("cursor_with_fetch_size", cursor_with_fetch_size)
    await report.check_async("reads_on_a_fresh_connection", reads_on_a_fresh_connection)
    await report.check_async("read_only_transactions", read_only_transactions)
    report.exit()


if __name__ == "__main__":
    asyncio.run(main())
