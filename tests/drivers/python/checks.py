"""What every Python driver program shares: where pgvigil and the replicas are, and the report.

The connection parameters come from libpq's environment variables (PGHOST, PGPORT, PGUSER,
PGPASSWORD, PGDATABASE), which psycopg and asyncpg both read; PGVIGIL_REPLICA_PORTS lists the
replicas' ports, comma-separated, to tell where `inet_server_port()` says a read ran.
"""

import os
import sys
import time
import traceback

#: How many reads a fresh connection makes to see where they land: balanced over three nodes, all
#: of them would land on the primary by chance about once in 500,000 runs.
READS = 12


def replica_ports():
    """The replicas' ports, from PGVIGIL_REPLICA_PORTS."""
    return {int(p) for p in os.environ["PGVIGIL_REPLICA_PORTS"].split(",") if p}


def check_reads(ports):
    """Fails unless at least one of the `ports` that served reads is a replica's."""
    replicas = replica_ports()
    on_replicas = sum(1 for p in ports if p in replicas)
    if on_replicas == 0:
        raise AssertionError(f"all {len(ports)} reads ran on the primary: ports {ports}")
    return f"{on_replicas} of {len(ports)} reads on replicas"


class Report:
    """Prints one line per check (`ok NAME[: detail]` or `FAIL NAME: why`), counts failures."""

    def __init__(self, driver, version):
        print(f"driver {driver} {version}", flush=True)
        self.failed = 0

    def _done(self, name, started, detail):
        ms = (time.monotonic() - started) * 1000
        suffix = f": {detail}" if detail else ""
        print(f"ok {name}{suffix} ({ms:.0f} ms)", flush=True)

    def _fail(self, name, error):
        self.failed += 1
        print(f"FAIL {name}: {type(error).__name__}: {error}", flush=True)
        traceback.print_exc(file=sys.stderr)

    def check(self, name, body):
        """Runs `body()`; its return value, if any, is printed after the name."""
        started = time.monotonic()
        try:
            detail = body()
        except Exception as error:  # noqa: BLE001 - every failure is reported the same way
            self._fail(name, error)
        else:
            self._done(name, started, detail)

    async def check_async(self, name, body):
        """Awaits `body()`; like `check`."""
        started = time.monotonic()
        try:
            detail = await body()
        except Exception as error:  # noqa: BLE001
            self._fail(name, error)
        else:
            self._done(name, started, detail)

    def exit(self):
        """Exits 1 if any check failed."""
        sys.exit(1 if self.failed else 0)
