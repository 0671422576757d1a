"""psycopg 3 through pgvigil: one line per check, exit status 1 if any failed (see checks.py)."""

import threading
import time

import psycopg
from psycopg import errors

from checks import READS, Report, check_reads

#: How long a cancelled statement would sleep: far longer than a cancel may take.
SLEEP = 30
#: Bound on a cancel's effect, generous for a loaded machine.
CANCEL_WITHIN = 10.0


def connect(**kwargs):
    """A connection through pgvigil, from the PG* environment variables."""
    return psycopg.connect("", connect_timeout=10, **kwargs)


def connect_and_query():
    with connect() as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        return f"server {conn.info.server_version}"


def prepared_past_threshold():
    # psycopg prepares a statement on the server once it ran prepare_threshold times (5), and at
    # once with prepare=True; the session's reads move between nodes meanwhile.
    with connect(autocommit=True) as conn:
        threshold = conn.prepare_threshold
        for i in range(threshold * 3):
            row = conn.execute("SELECT %s::int + 1, inet_server_port()", (i,)).fetchone()
            assert row[0] == i + 1, row
        for i in range(5):
            row = conn.execute("SELECT %s::text || 'x'", (str(i),), prepare=True).fetchone()
            assert row == (f"{i}x",), row
        return f"{threshold * 3} runs past prepare_threshold={threshold}, 5 with prepare=True"


def batch():
    with connect() as conn:
        conn.execute("DROP TABLE IF EXISTS psycopg_batch")
        conn.execute("CREATE TABLE psycopg_batch (id int PRIMARY KEY, name text)")
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO psycopg_batch VALUES (%s, %s)",
                [(i, f"n{i}") for i in range(500)],
            )
        conn.commit()
        count = conn.execute("SELECT count(*) FROM psycopg_batch").fetchone()[0]
        assert count == 500, count
        return "executemany of 500 rows"


def transaction_error_then_rollback():
    with connect() as conn:
        conn.execute("DROP TABLE IF EXISTS psycopg_tx")
        conn.execute("CREATE TABLE psycopg_tx (id int)")
        conn.commit()
        conn.execute("INSERT INTO psycopg_tx VALUES (1)")
        try:
            conn.execute("SELECT 1 / 0")
        except errors.DivisionByZero:
            pass
        else:
            raise AssertionError("1 / 0 did not fail")
        try:
            conn.execute("SELECT 1")
        except errors.InFailedSqlTransaction:
            pass
        else:
            raise AssertionError("the failed transaction accepted a statement")
        conn.rollback()
        count = conn.execute("SELECT count(*) FROM psycopg_tx").fetchone()[0]
        assert count == 0, f"the rolled back row is there ({count})"
        conn.rollback()


def copy_in_and_out():
    with connect() as conn, conn.cursor() as cur:
        cur.execute("DROP TABLE IF EXISTS psycopg_copy")
        cur.execute("CREATE TABLE psycopg_copy (id int, name text)")
        with cur.copy("COPY psycopg_copy (id, name) FROM STDIN") as copy:
            for i in range(1000):
                copy.write_row((i, f"text {i}"))
        with cur.copy("COPY psycopg_copy (id, name) FROM STDIN (FORMAT BINARY)") as copy:
            copy.set_types(["int4", "text"])
            for i in range(1000, 2000):
                copy.write_row((i, f"binary {i}"))
        conn.commit()
        with cur.copy("COPY (SELECT id, name FROM psycopg_copy ORDER BY id) TO STDOUT") as copy:
            rows = list(copy.rows())
        assert len(rows) == 2000, len(rows)
        assert rows[1500] == ("1500", "binary 1500"), rows[1500]
        with cur.copy("COPY psycopg_copy TO STDOUT (FORMAT BINARY)") as copy:
            copy.set_types(["int4", "text"])
            binary = list(copy.rows())
        assert len(binary) == 2000, len(binary)
        return "2000 rows in (text and binary) and out"


def listen_notify():
    with connect(autocommit=True) as listener, connect(autocommit=True) as notifier:
        listener.execute("LISTEN psycopg_channel")
        notifier.execute("NOTIFY psycopg_channel, 'hello'")
        got = list(listener.notifies(timeout=10, stop_after=1))
        assert [n.payload for n in got] == ["hello"], got


def cancel():
    with connect(autocommit=True) as conn:
        timer = threading.Timer(0.5, conn.cancel_safe)
        timer.start()
        started = time.monotonic()
        try:
            conn.execute(f"SELECT pg_sleep({SLEEP})")
        except errors.QueryCanceled:
            pass
        else:
            raise AssertionError("the sleep was not cancelled")
        finally:
            timer.cancel()
        waited = time.monotonic() - started
        assert waited < CANCEL_WITHIN, f"cancelled only after {waited:.1f} s"
        assert conn.execute("SELECT 1").fetchone() == (1,)
        return f"cancelled {waited * 1000 - 500:.0f} ms after the request"


def cursor_with_fetch_size():
    # A named cursor is server-side: DECLARE, then FETCH FORWARD itersize at a time.
    with connect() as conn:
        with conn.cursor(name="psycopg_cursor") as cur:
            cur.itersize = 10
            cur.execute("SELECT g FROM generate_series(1, 1000) AS g")
            total = sum(row[0] for row in cur)
        conn.commit()
        assert total == 500500, total
        return "1000 rows, 10 per fetch"


def pipeline():
    with connect(autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS psycopg_pipeline")
        conn.execute("CREATE TABLE psycopg_pipeline (id int)")
        with conn.pipeline():
            for i in range(100):
                conn.execute("INSERT INTO psycopg_pipeline VALUES (%s)", (i,))
            counted = conn.execute("SELECT count(*) FROM psycopg_pipeline")
            port = conn.execute("SELECT inet_server_port()")
        assert counted.fetchone() == (100,)
        assert port.fetchone()[0] > 0
        return "100 inserts and 2 reads in one pipeline"


def reads_on_a_fresh_connection():
    with connect(autocommit=True) as conn:
        ports = [conn.execute("SELECT inet_server_port()").fetchone()[0] for _ in range(READS)]
        return check_reads(ports)


def read_only_transactions():
    # conn.read_only makes psycopg open each transaction with BEGIN READ ONLY: a replica may run it.
    with connect() as conn:
        conn.read_only = True
        ports = []
        for _ in range(READS):
            ports.append(conn.execute("SELECT inet_server_port()").fetchone()[0])
            conn.commit()
        return check_reads(ports)


def reads_after_an_extended_set():
    # The reproduction of issue 17: a SET sent with Parse/Bind/Execute is no write.
    with connect(autocommit=True) as conn:
        conn.pgconn.exec_params(b"SET application_name = 'psycopg-ext'", [])
        ports = []
        for _ in range(READS):
            row = conn.execute("SELECT inet_server_port(), current_setting('application_name')")
            port, name = row.fetchone()
            assert name == "psycopg-ext", f"port {port} has application_name {name!r}"
            ports.append(port)
        return check_reads(ports)


def reads_after_a_set_in_a_pipeline():
    # Fetching a result inside a pipeline makes psycopg send a Flush, so the SET after it travels
    # in the same unsynced run of messages: it too is session state, not a write.
    with connect(autocommit=True) as conn:
        with conn.pipeline():
            assert conn.execute("SELECT 1").fetchone() == (1,)
            conn.execute("SET application_name = 'psycopg-pipeline'")
        ports = []
        for _ in range(READS):
            row = conn.execute("SELECT inet_server_port(), current_setting('application_name')")
            port, name = row.fetchone()
            assert name == "psycopg-pipeline", f"port {port} has application_name {name!r}"
            ports.append(port)
        return check_reads(ports)


def write_after_a_pipeline():
    # psycopg leaves a pipeline with Sync then Flush: what follows must still be routed, so a
    # write after a pipeline whose read ran on a replica reaches the primary.
    with connect(autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS psycopg_after_pipeline")
        conn.execute("CREATE TABLE psycopg_after_pipeline (id int)")
    ports = []
    for i in range(READS):
        with connect(autocommit=True) as conn:
            # Fetched after the pipeline's Sync: a read fetched inside the pipeline would make
            # psycopg wait after a Flush with the rest of its unit unsent, and such a unit runs on
            # the primary (its rest may write).
            with conn.pipeline():
                cursor = conn.execute("SELECT inet_server_port()")
            ports.append(cursor.fetchone()[0])
            conn.execute(f"INSERT INTO psycopg_after_pipeline VALUES ({i})")
    # Proof that some of the writes followed a read on a replica.
    return check_reads(ports)


def main():
    report = Report("psycopg", f"{psycopg.__version__} (libpq {psycopg.pq.version()})")
    report.check("connect", connect_and_query)
    report.check("prepared_past_threshold", prepared_past_threshold)
    report.check("batch", batch)
    report.check("transaction_error_then_rollback", transaction_error_then_rollback)
    report.check("copy_in_and_out", copy_in_and_out)
    report.check("listen_notify", listen_notify)
    report.check("cancel", cancel)
    report.check("cursor_with_fetch_size", cursor_with_fetch_size)
    report.check("pipeline", pipeline)
    report.check("reads_on_a_fresh_connection", reads_on_a_fresh_connection)
    report.check("read_only_transactions", read_only_transactions)
    report.check("reads_after_an_extended_set", reads_after_an_extended_set)
    report.check("reads_after_a_set_in_a_pipeline", reads_after_a_set_in_a_pipeline)
    report.check("write_after_a_pipeline", write_after_a_pipeline)
    report.exit()


if __name__ == "__main__":
    main()
