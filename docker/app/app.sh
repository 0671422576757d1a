#!/bin/sh
# The example application: in a loop, one write and one read through the pgvigil sidecar at
# localhost:9999 (PGHOST, PGPORT, PGUSER, PGPASSWORD, PGDATABASE from compose.yaml), each on a
# new connection. It prints "ack N MS" once write N is committed (MS: milliseconds since the
# epoch) and "fail N ..." when it is not acknowledged, so acknowledged writes can be counted
# (docker/test.sh does).
set -u
app="${APP_NAME:?APP_NAME must be set}"
n=0
while :; do
    n=$((n + 1))
    if out="$(psql -XqAt -v ON_ERROR_STOP=1 -c "INSERT INTO ticks (app, n) VALUES ('$app', $n)" 2>&1)"; then
        echo "ack $n $(date +%s%3N)"
    else
        echo "fail $n $(date +%s%3N) $out" | tr '\n' ' '
        echo
    fi
    psql -XqAt -c "SELECT count(*) FROM ticks WHERE app = '$app'" >/dev/null 2>&1
    sleep "${APP_PAUSE:-0.05}"
done
