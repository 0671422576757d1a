#!/usr/bin/env bash
# Macro benchmark: pgbench against PostgreSQL directly, through PgBouncer and through pgvigil, in
# interleaved rounds, reporting medians. Three runs:
#   single  one primary; targets: direct, PgBouncer and pgvigil each in session and transaction
#           pooling. Per workload it reports every target's TPS and the proxies' CPU time per
#           transaction (utime + stime from /proc over the run), and each pgvigil's peak
#           resident memory so far (VmHWM from /proc, after that workload's last run), and
#           for `-M prepared` pgvigil's transaction-pooling TPS over its session-pooling TPS
#           (PgBouncer before 1.21 fails that row in transaction pooling, as in the txn run).
#   split   read/write splitting: the primary gets two streaming replicas (pg_basebackup -R, hot
#           standby); read-only workloads against the primary directly, PgBouncer (transaction
#           pooling, on the primary), pgvigil with only the primary in [[nodes]] (baseline) and
#           pgvigil with all three nodes, whose reads are balanced over them, and as a floor the
#           two standbys directly (two pgbench processes at once, one per standby, each with half
#           the clients): the machine's own standbys-over-primary ratio, to hold pgvigil's
#           3-node-over-primary-only ratio against. For each run of the 3-node pgvigil it also
#           reports how the transactions spread over the nodes.
#   txn     transaction pooling: the primary directly, PgBouncer and pgvigil both in transaction
#           pooling, with every query mode (-M prepared needs PgBouncer 1.21+, which gets
#           max_prepared_statements = 200; older ones fail those rows); besides TPS it reports
#           each proxy's CPU time per transaction (utime + stime from /proc over the run). The
#           floor target (benches/floor/relay.rs) copies bytes between each client and a server
#           connection of its own and does nothing else: the same socket calls per round trip
#           as both proxies, so its CPU time is the least any proxy making them can spend.
#   memory  memory, not speed (the `memory_load` example as the client): each proxy's resident
#           memory before and at its peak while one 256 MiB bytea value passes through it (a
#           SELECT, COPY TO STDOUT, an INSERT's Bind, COPY FROM STDIN, each checked byte-exact
#           against md5()), for pgvigil in session and in transaction pooling and PgBouncer in
#           transaction pooling;
#           then pgvigil's growth with MEMORY_CLIENTS idle clients (transaction pooling over 20
#           server connections, each client logged in and having run one query).
#
# Usage: benches/pgbench.sh            (from anywhere; run as root or as a user who can run initdb)
#   RUNS=single   which run: single, split, txn, memory or all (all four)
#   DURATION=10   seconds per pgbench run (integer)
#   ROUNDS=3      interleaved rounds (in each: every workload, every target in turn)
#   SCALE=10      pgbench scale factor, initialised once
#   MEMORY_CLIENTS=5000  idle clients of the memory run
#   SPLIT_BALANCE unset: the 3-node pgvigil config has no balance key (the default,
#                 least_connections); round_robin, random or least_connections: written as
#                 [routing] balance
#   SPLIT_AFFINITY unset: the 3-node pgvigil config has no read_affinity key (the default,
#                 session: a session's reads stay on one node); unit or session: written as
#                 [routing] read_affinity
#   PGVIGIL_BIN   use this pgvigil binary instead of building target/release/pgvigil
#                 (under $CARGO_TARGET_DIR when that is set)
#   PGVIGIL_THREADS unset: pgvigil's default data-plane threads (one per core); a number: written
#                 as `threads` in every pgvigil config (1 runs one thread, as PgBouncer does)
#   POOL_MODE     unset: each pgvigil target's own pooling mode; session or transaction: every
#                 pgvigil target's `[pool] mode` (the split run's two pgvigils, say)
#   PGVIGIL_PARK  unset: pgvigil's default (`[pool] park = false`); true or false: written as
#                 `[pool] park` in every pgvigil config (parked connections, transaction pooling)
#   PG_BIN        PostgreSQL server bin dir (default: newest /usr/lib/postgresql/*/bin)
#
# Expected runtime with the defaults, plus the release build (a few minutes when target/release is
# cold) and ~1 min for the cluster and pgbench -i at scale 10. Run it on a quiet machine.
#   single  9 workloads x 5 targets x 3 rounds x 10 s = 23 min of pgbench, ~25 min in all.
#   split   4 workloads x 5 targets x 3 rounds x 10 s = 10 min of pgbench, plus 2 x 11 s of
#           waiting for statistics around each of the 12 runs of the 3-node pgvigil (4.4 min) and
#           ~1 min for the replicas: ~16 min.
#   txn     5 workloads x 4 targets x 3 rounds x 10 s = 10 min of pgbench, ~12 min in all.
#   memory  ~2 min: three 256 MiB values generated and passed three ways, 5,000 SCRAM logins.
#   all     ~55 min.
#
# The cluster is built here (initdb + pg_ctl, as the `postgres` OS user when root) rather than with
# `pgvigil demo`, to get max_connections for every target's pool at once and a pgvigil config with
# [pool] max_size = 100 (the demo uses the default 20). fsync stays on; synchronous_commit is off so
# that the TPC-B-like workload measures the proxies rather than the disk's flush latency. The
# replicas are built only for the split run, after the single run, so that WAL shipping and replay
# never share the machine with the single run.
set -euo pipefail

RUNS=${RUNS:-single}
DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-3}
SCALE=${SCALE:-10}
SPLIT_BALANCE=${SPLIT_BALANCE:-}
SPLIT_AFFINITY=${SPLIT_AFFINITY:-}
MEMORY_CLIENTS=${MEMORY_CLIENTS:-5000}
THREADS=2
APP_USER=app
APP_PASSWORD=app-secret
APP_DB=app
SINGLE_TARGETS=(direct pgbouncer-session pgbouncer-transaction pgvigil pgvigil-txn)
# name|pgbench options (besides -T, -j and the connection)
SINGLE_WORKLOADS=(
    "select-simple-c1|-S -M simple -c 1"
    "select-simple-c16|-S -M simple -c 16"
    "select-simple-c64|-S -M simple -c 64"
    "select-extended-c1|-S -M extended -c 1"
    "select-extended-c16|-S -M extended -c 16"
    "select-extended-c64|-S -M extended -c 64"
    "select-prepared-c64|-S -M prepared -c 64"
    "tpcb-like-c16|-M simple -c 16"
    "connect-select-c8|-C -S -M simple -c 8"
)
# direct-standbys: the standbys directly, no proxy (see run_standbys).
SPLIT_TARGETS=(direct direct-standbys pgbouncer-transaction pgvigil pgvigil-3node)
SPLIT_WORKLOADS=(
    "select-simple-c16|-S -M simple -c 16"
    "select-simple-c64|-S -M simple -c 64"
    "select-extended-c16|-S -M extended -c 16"
    "select-extended-c64|-S -M extended -c 64"
)
TXN_TARGETS=(direct pgbouncer-transaction floor pgvigil-txn)
TXN_WORKLOADS=(
    "select-simple-c64|-S -M simple -c 64"
    "select-extended-c64|-S -M extended -c 64"
    "select-prepared-c64|-S -M prepared -c 64"
    "tpcb-prepared-c16|-M prepared -c 16"
    "tpcb-simple-c16|-M simple -c 16"
)
# Nodes of the split run, the primary first; pgvigil-3node has them all in [[nodes]].
NODES=(pg1 pg2 pg3)
# A backend keeps its statistics pending for up to PGSTAT_IDLE_INTERVAL (10 s, in PostgreSQL's
# src/backend/utils/activity/pgstat.c) once idle, and pooled backends stay idle rather than exit
# (exiting would flush them): pg_stat_database holds all of a run's commits only 10 s after it
# ends, and this wait cannot be observed from outside. One second of margin.
STATS_SETTLE=11

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=""
RUN=""
TARGETS=()
WORKLOADS=()
# pgvigil and floor relay processes started, stopped at exit.
STARTED_PIDS=()
# Data directories of the servers started, the primary first.
PG_DATA_DIRS=()
declare -A PORT=()
# Process id of each proxy target, for its CPU time.
declare -A PID=()
FAILED_RUNS=0

say() { printf '%s %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { say "error: $*"; exit 1; }

# Whether run $1 (single, split or txn) is selected by RUNS.
wants() { [[ $RUNS == all || $RUNS == "$1" ]]; }

# Runs a command as the unprivileged server user when we are root (postgres and pgbouncer both
# refuse to run as root), else as ourselves.
as_server_user() {
    if [[ $(id -u) -eq 0 ]]; then
        runuser -u "$SERVER_USER" -- "$@"
    else
        "$@"
    fi
}

cleanup() {
    local status=$?
    trap - EXIT INT TERM
    set +e
    local pidfile pid i
    for pidfile in "$WORK"/pgbouncer-*/pgbouncer.pid; do
        [[ -f $pidfile ]] && kill "$(cat "$pidfile")" 2>/dev/null
    done
    for pid in "${STARTED_PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
    done
    # Replicas before their primary, so that they do not keep trying to reconnect to it.
    for ((i = ${#PG_DATA_DIRS[@]} - 1; i >= 0; i--)); do
        as_server_user "$PG_BIN/pg_ctl" -D "${PG_DATA_DIRS[i]}" -m fast -w stop >/dev/null 2>&1
    done
    # Give pgbouncer a moment to exit before its directory goes away.
    sleep 0.5
    [[ -n $WORK && -d $WORK ]] && rm -rf "$WORK"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

port_is_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Picks a free loopback port at or above $1 that no target or node uses yet.
pick_port() {
    local port=$1
    while ! port_is_free "$port" || [[ " ${PORT[*]} " == *" $port "* ]]; do
        port=$((port + 1))
    done
    echo "$port"
}

# Waits until `app` can run a query on port $1 (name $2 for the message); fails after 30 s.
wait_ready() {
    local port=$1 name=$2 tries=0
    until PGPASSWORD=$APP_PASSWORD psql -h 127.0.0.1 -p "$port" -U "$APP_USER" -d "$APP_DB" \
        -XAtqc 'SELECT 1' >/dev/null 2>&1; do
        tries=$((tries + 1))
        if ((tries >= 100)); then
            say "$name on port $port does not accept queries after 30 s"
            return 1
        fi
        sleep 0.3
    done
}

# Runs query $2 as the superuser directly on node $1 (not through a proxy); prints the result.
node_sql() {
    psql -h 127.0.0.1 -p "${PORT[$1]}" -U postgres -d postgres -XAtq -v ON_ERROR_STOP=1 -c "$2"
}

check_tools() {
    local bin
    bin=${PG_BIN:-$(compgen -G '/usr/lib/postgresql/*/bin' | sort -V | tail -n 1 || true)}
    [[ -n $bin ]] || bin=$(dirname "$(command -v initdb || echo /nonexistent/initdb)")
    [[ -x $bin/initdb && -x $bin/pg_ctl ]] || die "PostgreSQL server binaries not found (set PG_BIN)"
    PG_BIN=$bin
    if wants split; then
        [[ -x $PG_BIN/pg_basebackup ]] || die "pg_basebackup not found in $PG_BIN"
    fi
    PGBENCH=$PG_BIN/pgbench
    [[ -x $PGBENCH ]] || PGBENCH=$(command -v pgbench) || die "pgbench not found"
    command -v psql >/dev/null || die "psql not found"
    if ! command -v pgbouncer >/dev/null && [[ ! -x /usr/sbin/pgbouncer ]]; then
        [[ $(id -u) -eq 0 ]] || die "pgbouncer not installed (apt-get install pgbouncer as root)"
        say "installing pgbouncer"
        DEBIAN_FRONTEND=noninteractive apt-get install -y pgbouncer >/dev/null ||
            die "apt-get install pgbouncer failed"
    fi
    PGBOUNCER=$(command -v pgbouncer || echo /usr/sbin/pgbouncer)
    SERVER_USER=postgres
    if [[ $(id -u) -eq 0 ]]; then
        id "$SERVER_USER" >/dev/null 2>&1 || die "no '$SERVER_USER' OS user to run the servers as"
    fi
}

build_pgvigil() {
    if [[ -n ${PGVIGIL_BIN:-} ]]; then
        [[ -x $PGVIGIL_BIN ]] || die "PGVIGIL_BIN=$PGVIGIL_BIN is not executable"
        say "using $PGVIGIL_BIN (not building)"
        return
    fi
    say "building pgvigil (release)"
    (cd "$REPO" && cargo build --release --bin pgvigil) || die "cargo build --release failed"
    PGVIGIL_BIN=${CARGO_TARGET_DIR:-$REPO/target}/release/pgvigil
}

# The memory run's client (benches/memory/load.rs).
build_memory_load() {
    say "building the memory_load example (release)"
    (cd "$REPO" && cargo build --release --example memory_load) ||
        die "cargo build --release --example memory_load failed"
    MEMORY_LOAD=${CARGO_TARGET_DIR:-$REPO/target}/release/examples/memory_load
}

# The txn run's floor target (benches/floor/relay.rs).
build_floor_relay() {
    say "building the floor_relay example (release)"
    (cd "$REPO" && cargo build --release --example floor_relay) ||
        die "cargo build --release --example floor_relay failed"
    FLOOR_RELAY=${CARGO_TARGET_DIR:-$REPO/target}/release/examples/floor_relay
}

make_work_dir() {
    WORK=$(mktemp -d /tmp/pgvigil-bench.XXXXXX)
    chmod 0711 "$WORK"
    mkdir -p "$WORK/pg" "$WORK/pgbouncer-session" "$WORK/pgbouncer-transaction" "$WORK/runs"
    if [[ $(id -u) -eq 0 ]]; then
        chown "$SERVER_USER": "$WORK/pg" "$WORK/pgbouncer-session" "$WORK/pgbouncer-transaction"
    fi
}

start_postgres() {
    PORT[direct]=$(pick_port 25432)
    PORT[pg1]=${PORT[direct]}
    local data=$WORK/pg/data
    say "initdb and start PostgreSQL on port ${PORT[direct]}"
    as_server_user "$PG_BIN/initdb" -D "$data" -U postgres --auth-local=trust \
        --auth-host=scram-sha-256 -E UTF8 --locale=C >"$WORK/initdb.log" 2>&1 ||
        { cat "$WORK/initdb.log" >&2; die "initdb failed"; }
    # The superuser (setup, replication, statistics) may use trust; `app` logs in with SCRAM
    # everywhere, as through the proxies. pg_basebackup copies this file to the replicas.
    as_server_user tee "$data/pg_hba.conf" >/dev/null <<EOF
local all all trust
host all postgres 127.0.0.1/32 trust
host replication postgres 127.0.0.1/32 trust
host all all 127.0.0.1/32 scram-sha-256
EOF
    # max_connections: each target holds at most 64 connections to a node (the most clients of
    # any workload), and at most five targets reach the primary (direct, two PgBouncers, two
    # pgvigils), so 320 and a few for the health probes and psql. The replicas inherit it, as
    # hot standby requires.
    as_server_user tee -a "$data/postgresql.conf" >/dev/null <<EOF
listen_addresses = '127.0.0.1'
port = ${PORT[direct]}
unix_socket_directories = '$WORK/pg'
max_connections = 400
shared_buffers = 128MB
synchronous_commit = off
EOF
    PG_DATA_DIRS+=("$data")
    as_server_user "$PG_BIN/pg_ctl" -D "$data" -l "$WORK/pg/postgres.log" -w -t 60 start \
        >/dev/null || { tail -n 20 "$WORK/pg/postgres.log" >&2; die "PostgreSQL did not start"; }
    psql -h 127.0.0.1 -p "${PORT[direct]}" -U postgres -d postgres -XAtq -v ON_ERROR_STOP=1 \
        -c "CREATE ROLE $APP_USER LOGIN PASSWORD '$APP_PASSWORD'" \
        -c "CREATE DATABASE $APP_DB OWNER $APP_USER" >/dev/null || die "cannot create role/db"
    wait_ready "${PORT[direct]}" PostgreSQL || die "PostgreSQL refuses app"
}

# Clones the primary into replica $1, a hot standby streaming through its own replication slot,
# and starts it on its own port.
start_replica() {
    local node=$1 data=$WORK/pg/$1
    PORT[$node]=$(pick_port 25432)
    say "pg_basebackup and start replica $node on port ${PORT[$node]}"
    # application_name lands in the primary_conninfo that -R writes, so that
    # pg_stat_replication on the primary names the replica.
    as_server_user "$PG_BIN/pg_basebackup" -D "$data" -R -C -S "$node" -X stream -c fast \
        -d "host=127.0.0.1 port=${PORT[pg1]} user=postgres application_name=$node" \
        >"$WORK/basebackup-$node.log" 2>&1 ||
        { cat "$WORK/basebackup-$node.log" >&2; die "pg_basebackup for $node failed"; }
    # The copied postgresql.conf carries the primary's port; the last setting of a name wins.
    # pgbench VACUUMs two of its tables on the primary before every run: with feedback, replaying
    # that cleanup never has to cancel a read on the replica.
    as_server_user tee -a "$data/postgresql.conf" >/dev/null <<EOF
port = ${PORT[$node]}
hot_standby = on
hot_standby_feedback = on
EOF
    PG_DATA_DIRS+=("$data")
    as_server_user "$PG_BIN/pg_ctl" -D "$data" -l "$WORK/pg/$node.log" -w -t 60 start \
        >/dev/null || { tail -n 20 "$WORK/pg/$node.log" >&2; die "replica $node did not start"; }
}

# Waits until every replica has replayed the primary's WAL up to now: pgbench reads the scale
# from pgbench_branches, wherever pgvigil sends that query. Fails after 60 s.
wait_replayed() {
    local lsn node tries
    lsn=$(node_sql pg1 'SELECT pg_current_wal_lsn()') || die "cannot read the primary's WAL LSN"
    for node in "${NODES[@]:1}"; do
        tries=0
        until [[ $(node_sql "$node" "SELECT pg_last_wal_replay_lsn() >= '$lsn'" 2>/dev/null) == t ]]
        do
            tries=$((tries + 1))
            ((tries < 200)) || die "replica $node has not replayed the WAL up to $lsn in 60 s"
            sleep 0.3
        done
    done
    say "replicas have replayed the primary's WAL up to $lsn"
}

# Starts pgvigil as target $1 with the nodes $3... in [[nodes]], and `[routing] balance = "$2"`
# unless $2 is empty; `[pool] mode` is $POOL_MODE (default session), `max_size` $POOL_SIZE
# (default 100), `max_client_conn` $MAX_CLIENT_CONN (default pgvigil's).
start_pgvigil() {
    local target=$1 balance=$2 node config=$WORK/$1.toml
    shift 2
    PORT[$target]=$(pick_port 26432)
    {
        printf 'listen = "127.0.0.1:%s"\n' "${PORT[$target]}"
        if [[ -n ${PGVIGIL_THREADS:-} ]]; then
            printf 'threads = %s\n' "$PGVIGIL_THREADS"
        fi
        if [[ -n ${MAX_CLIENT_CONN:-} ]]; then
            printf 'max_client_conn = %s\n' "$MAX_CLIENT_CONN"
        fi
        printf '\n[pool]\nmax_size = %s\nmode = "%s"\n' "${POOL_SIZE:-100}" "${POOL_MODE:-session}"
        if [[ -n ${PGVIGIL_PARK:-} ]]; then
            printf 'park = %s\n' "$PGVIGIL_PARK"
        fi
        # Several pgvigil targets run at once: each admin API on a port of its own.
        printf '\n[admin]\nlisten = "127.0.0.1:0"\n'
        # The probes must see pg_stat_wal_receiver (README: health.user is a superuser): as
        # `app` its status reads NULL, every standby looks not streaming and takes no reads.
        # The superuser logs in over loopback with trust (see start_postgres).
        printf '\n[health]\nuser = "postgres"\npassword = "unused"\n'
        if [[ -n $balance || -n ${READ_AFFINITY:-} ]]; then
            printf '\n[routing]\n'
            [[ -z $balance ]] || printf 'balance = "%s"\n' "$balance"
            [[ -z ${READ_AFFINITY:-} ]] || printf 'read_affinity = "%s"\n' "$READ_AFFINITY"
        fi
        for node in "$@"; do
            printf '\n[[nodes]]\nname = "%s"\nhost = "127.0.0.1"\nport = %s\n' \
                "$node" "${PORT[$node]}"
        done
        printf '\n[[users]]\nname = "%s"\npassword = "%s"\nauth = "scram-sha-256"\n' \
            "$APP_USER" "$APP_PASSWORD"
    } >"$config"
    say "start $target ($*) on port ${PORT[$target]}${PGVIGIL_THREADS:+, threads = $PGVIGIL_THREADS}"
    PGVIGIL_LOG=warn "$PGVIGIL_BIN" serve --config "$config" >"$WORK/$target.log" 2>&1 &
    STARTED_PIDS+=("$!")
    PID[$target]=$!
    wait_ready "${PORT[$target]}" "$target" ||
        { tail -n 20 "$WORK/$target.log" >&2; die "$target did not start"; }
}

# Starts the floor target: the byte relay in front of the primary.
start_floor() {
    PORT[floor]=$(pick_port 28432)
    say "start floor relay on port ${PORT[floor]}"
    "$FLOOR_RELAY" --listen "127.0.0.1:${PORT[floor]}" --server "127.0.0.1:${PORT[direct]}" \
        >"$WORK/floor.log" 2>&1 &
    STARTED_PIDS+=("$!")
    PID[floor]=$!
    wait_ready "${PORT[floor]}" floor || { tail -n 20 "$WORK/floor.log" >&2; die "floor did not start"; }
}

# Starts one PgBouncer in pool mode $1 (session or transaction) as the server user.
start_pgbouncer() {
    local mode=$1 dir=$WORK/pgbouncer-$1 port secret
    port=$(pick_port 27432)
    PORT[pgbouncer-$mode]=$port
    # The user's SCRAM verifier, as PgBouncer is set up in production (from pg_authid or an
    # auth_query), not the password: with the password PgBouncer derives the keys (PBKDF2, about
    # 5 ms of its CPU) at every login, which in a 5 s run with 64 clients added several µs to its
    # CPU per transaction; with the verifier it checks the client's proof and passes it on.
    secret=$(node_sql pg1 "SELECT rolpassword FROM pg_authid WHERE rolname = '$APP_USER'") ||
        die "cannot read the SCRAM verifier of $APP_USER"
    [[ $secret == SCRAM-SHA-256* ]] || die "$APP_USER has no SCRAM verifier: $secret"
    as_server_user tee "$dir/userlist.txt" >/dev/null <<<"\"$APP_USER\" \"$secret\""
    as_server_user tee "$dir/pgbouncer.ini" >/dev/null <<EOF
[databases]
$APP_DB = host=127.0.0.1 port=${PORT[direct]} dbname=$APP_DB

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $port
unix_socket_dir =
auth_type = scram-sha-256
auth_file = $dir/userlist.txt
pool_mode = $mode
default_pool_size = 100
max_client_conn = 1000
logfile = $dir/pgbouncer.log
pidfile = $dir/pgbouncer.pid
log_connections = 0
log_disconnections = 0
$(prepared_statements_setting "$mode")
EOF
    say "start pgbouncer ($mode pooling) on port $port"
    as_server_user "$PGBOUNCER" -d "$dir/pgbouncer.ini" ||
        { tail -n 20 "$dir/pgbouncer.log" >&2 || true; die "pgbouncer ($mode) did not start"; }
    wait_ready "$port" "pgbouncer ($mode)" ||
        { tail -n 20 "$dir/pgbouncer.log" >&2 || true; die "pgbouncer ($mode) is not usable"; }
    PID[pgbouncer-$mode]=$(as_server_user cat "$dir/pgbouncer.pid")
}

# PgBouncer 1.21+ supports protocol-level prepared statements in transaction pooling once
# max_prepared_statements is set (PgBouncer's own default, 200, from 1.24 on); older versions
# reject the key, and pgbench -M prepared fails through them in transaction pooling.
prepared_statements_setting() {
    local version
    [[ $1 == transaction ]] || return 0
    version=$("$PGBOUNCER" --version | awk 'NR == 1 {print $2}')
    if printf '%s\n1.20.99\n' "$version" | sort -V -C 2>/dev/null; then
        say "PgBouncer $version has no max_prepared_statements: its -M prepared rows will fail"
    else
        echo "max_prepared_statements = 200"
    fi
}

# CPU time of process $1 so far, in clock ticks, as "user system"; empty without a process.
cpu_ticks() {
    [[ -n ${1:-} && -r /proc/$1/stat ]] || return 0
    # Fields after the command name, which is in parentheses and may hold spaces.
    sed 's/^.*) //' "/proc/$1/stat" | awk '{print $12, $13}'
}

# Peak resident memory (VmHWM) of process $1 so far, in KiB; empty without a process.
peak_rss_kib() {
    [[ -n ${1:-} && -r /proc/$1/status ]] || return 0
    awk '/^VmHWM:/ {print $2; exit}' "/proc/$1/status"
}

init_pgbench() {
    say "pgbench -i -s $SCALE (directly)"
    PGPASSWORD=$APP_PASSWORD "$PGBENCH" -i -s "$SCALE" -q -h 127.0.0.1 -p "${PORT[direct]}" \
        -U "$APP_USER" "$APP_DB" >"$WORK/init.log" 2>&1 ||
        { cat "$WORK/init.log" >&2; die "pgbench -i failed"; }
}

# Makes run $1 (single or split) the one under way: its targets, workloads and results.
use_run() {
    RUN=$1
    if [[ $RUN == single ]]; then
        TARGETS=("${SINGLE_TARGETS[@]}")
        WORKLOADS=("${SINGLE_WORKLOADS[@]}")
    elif [[ $RUN == txn ]]; then
        TARGETS=("${TXN_TARGETS[@]}")
        WORKLOADS=("${TXN_WORKLOADS[@]}")
    else
        TARGETS=("${SPLIT_TARGETS[@]}")
        WORKLOADS=("${SPLIT_WORKLOADS[@]}")
    fi
    mkdir -p "$WORK/runs/$RUN"
}

# Checks the output $1 of a pgbench run that exited with status $2: prints "tps latency_ms
# transactions" when it succeeded (status 0, both figures there, no failed transactions), else
# shows why, naming the run $3, and returns 1; the caller counts the failure.
pgbench_outcome() {
    local out=$1 status=$2 tps latency failed txns
    tps=$(awk '/^tps = /{print $3; exit}' "$out")
    txns=$(awk -F'[:/]' '/^number of transactions actually processed/{print $2 + 0; exit}' "$out")
    latency=$(awk '/^latency average = /{print $4; exit}' "$out")
    failed=$(awk -F': ' '/^number of failed transactions/{split($2, a, " "); print a[1]; exit}' "$out")
    if [[ $status -ne 0 || -z $tps || -z $latency || ${failed:-0} != 0 ]]; then
        say "FAILED: $3 (exit $status, failed transactions ${failed:-?}):"
        grep -v '^progress' "$out" | tail -n 15 >&2 || true
        return 1
    fi
    echo "$tps $latency ${txns:-0}"
}

# One pgbench run: workload options $3 against target $2; appends "tps latency_ms cpu_us
# peak_rss_kib user_us system_us" to the results of workload $1 and target $2 (the CPU times per
# transaction, "-" for a target without a process of its own; the RSS "-" for PgBouncer), or
# counts a failure and shows why.
run_one() {
    local workload=$1 target=$2 opts=$3 out status=0 cpu_before cpu_after result
    out=$WORK/runs/$RUN/$workload.$target.$round.log
    cpu_before=$(cpu_ticks "${PID[$target]:-}")
    # shellcheck disable=SC2086 # $opts holds several options on purpose
    PGPASSWORD=$APP_PASSWORD "$PGBENCH" -h 127.0.0.1 -p "${PORT[$target]}" -U "$APP_USER" \
        -T "$DURATION" -j "$THREADS" $opts "$APP_DB" >"$out" 2>&1 || status=$?
    cpu_after=$(cpu_ticks "${PID[$target]:-}")
    if ! result=$(pgbench_outcome "$out" "$status" "$workload on $target"); then
        FAILED_RUNS=$((FAILED_RUNS + 1))
        # pgvigil's own view of the failure (a probe that failed, a node called down).
        if [[ -f $WORK/$target.log ]]; then
            say "last warnings of $target:"
            grep -E 'WARN|ERROR' "$WORK/$target.log" | grep -v 'state_dir is not set' |
                tail -n 5 >&2 || true
        fi
        return
    fi
    local tps latency txns cpu_per_txn="" split="- -"
    read -r tps latency txns <<<"$result"
    if [[ -n $cpu_before && -n $cpu_after && $txns -gt 0 ]]; then
        # Microseconds of the proxy's CPU per transaction: in all, then user and system.
        read -r cpu_per_txn split < <(awk -v b="$cpu_before" -v a="$cpu_after" \
            -v hz="$(getconf CLK_TCK)" -v n="$txns" 'BEGIN {
                split(b, x, " "); split(a, y, " ")
                u = (y[1] - x[1]) * 1e6 / hz / n; s = (y[2] - x[2]) * 1e6 / hz / n
                printf "%.1f %.1f %.1f\n", u + s, u, s
            }')
    fi
    local rss=""
    [[ $target == pgvigil* ]] && rss=$(peak_rss_kib "${PID[$target]:-}")
    echo "$tps $latency ${cpu_per_txn:--} ${rss:--} $split" >>"$WORK/runs/$RUN/$workload.$target.results"
    say "  $workload on $target: tps $tps, latency $latency ms"
}

# One run of workload $1 (options $2) as target direct-standbys: the standbys directly, no proxy,
# all at once, one pgbench process each with an even share of the -c clients and the same -T and
# -M. Appends "tps latency_ms - - - -" to the results: the processes' TPS summed and their average
# latencies averaged (each has as many clients: the client-weighted mean); no CPU or RSS, there is
# no proxy process. Any process failing counts as one failed run, as in run_one.
run_standbys() {
    local workload=$1 opts=$2 clients="" per threads i node out status result ok=1 lines=""
    local tps latency
    local -a words args=() standbys=("${NODES[@]:1}") pids=()
    read -ra words <<<"$opts"
    for ((i = 0; i < ${#words[@]}; i++)); do
        if [[ ${words[i]} == -c ]]; then
            i=$((i + 1))
            clients=${words[i]:-}
        else
            args+=("${words[i]}")
        fi
    done
    if [[ ! $clients =~ ^[1-9][0-9]*$ ]] || ((clients % ${#standbys[@]} != 0)); then
        die "direct-standbys: workload $workload needs -c N with N a multiple of ${#standbys[@]}"
    fi
    per=$((clients / ${#standbys[@]}))
    # -j is divided as well (at least 1, at most the process's clients): with THREADS = 2, -j 1
    # per process, so the pgbench processes run THREADS threads between them, each driving as
    # many clients as a thread of every other target's single process. -j $THREADS in each would
    # add client threads competing with the servers for the same cores, and only here.
    threads=$((THREADS / ${#standbys[@]}))
    ((threads >= 1)) || threads=1
    ((threads <= per)) || threads=$per
    for node in "${standbys[@]}"; do
        out=$WORK/runs/$RUN/$workload.direct-standbys.$node.$round.log
        # -n: a standby refuses the VACUUM and TRUNCATE pgbench runs before measuring (pgbench
        # would print the error and carry on); the VACUUMs of the other targets' runs on the
        # primary reach the standbys by replay.
        PGPASSWORD=$APP_PASSWORD "$PGBENCH" -h 127.0.0.1 -p "${PORT[$node]}" -U "$APP_USER" \
            -T "$DURATION" -j "$threads" -c "$per" -n "${args[@]}" "$APP_DB" >"$out" 2>&1 &
        pids+=("$!")
    done
    for i in "${!standbys[@]}"; do
        node=${standbys[i]}
        out=$WORK/runs/$RUN/$workload.direct-standbys.$node.$round.log
        status=0
        wait "${pids[i]}" || status=$?
        if result=$(pgbench_outcome "$out" "$status" "$workload on direct-standbys ($node)"); then
            lines+="$result"$'\n'
        else
            ok=0
        fi
    done
    if ((!ok)); then
        FAILED_RUNS=$((FAILED_RUNS + 1))
        return
    fi
    read -r tps latency < <(printf '%s' "$lines" |
        awk '{tps += $1; latency += $2} END {printf "%.6f %.3f\n", tps, latency / NR}')
    echo "$tps $latency - - - -" >>"$WORK/runs/$RUN/$workload.direct-standbys.results"
    say "  $workload on direct-standbys: tps $tps, latency $latency ms" \
        "(${#standbys[@]} x -c $per -j $threads)"
}

# Prints "node commits" for every node: sum(xact_commit) over its pg_stat_database.
commits_per_node() {
    local node commits
    for node in "${NODES[@]}"; do
        commits=$(node_sql "$node" 'SELECT sum(xact_commit) FROM pg_stat_database') ||
            die "cannot read pg_stat_database on $node"
        echo "$node $commits"
    done
}

# Runs workload $1 (options $2) on pgvigil-3node and writes how many transactions each node
# committed meanwhile to <workload>.pgvigil-3node.<round>.reads, as "node commits" lines. The
# counts include, and nothing subtracts, pgvigil's health probes (one query per node and second),
# the statements pgbench runs before measuring (the scale query, VACUUM, TRUNCATE) and the first
# snapshot's own psql session. Few probes show, though: in trials, PostgreSQL 15 held back the
# statistics of a connection querying once a second until it closed, and an idle replica's count
# grew by 2 to 6 per run.
run_counting_reads() {
    local workload=$1 opts=$2 base
    base=$WORK/runs/$RUN/$workload.pgvigil-3node.$round
    # Earlier runs' pooled backends must flush their pending statistics before the first
    # snapshot, and this run's before the second.
    sleep "$STATS_SETTLE"
    commits_per_node >"$base.before"
    run_one "$workload" pgvigil-3node "$opts"
    sleep "$STATS_SETTLE"
    commits_per_node >"$base.after"
    paste -d ' ' "$base.before" "$base.after" | awk '{print $1, $4 - $2}' >"$base.reads"
}

# Fills every pool before measuring, so that no target pays for opening server connections in
# round 1 and not later; the results are not kept and a failure is only a warning. The
# direct-standbys target has no port of its own: each standby in turn.
warm_up() {
    local target node log
    for target in "${TARGETS[@]}"; do
        if [[ $target == direct-standbys ]]; then
            for node in "${NODES[@]:1}"; do
                say "warm-up: 64 clients on $node (direct-standbys)"
                log=$WORK/runs/$RUN/warm-up.$target.$node.log
                PGPASSWORD=$APP_PASSWORD "$PGBENCH" -h 127.0.0.1 -p "${PORT[$node]}" \
                    -U "$APP_USER" -T 2 -j "$THREADS" -c 64 -S -n "$APP_DB" >"$log" 2>&1 ||
                    say "warning: warm-up on $node failed: $(tail -n 1 "$log")"
            done
            continue
        fi
        say "warm-up: 64 clients on $target"
        log=$WORK/runs/$RUN/warm-up.$target.log
        PGPASSWORD=$APP_PASSWORD "$PGBENCH" -h 127.0.0.1 -p "${PORT[$target]}" -U "$APP_USER" \
            -T 2 -j "$THREADS" -c 64 -S "$APP_DB" >"$log" 2>&1 ||
            say "warning: warm-up on $target failed: $(tail -n 1 "$log")"
    done
}

run_rounds() {
    local entry name opts target
    for ((round = 1; round <= ROUNDS; round++)); do
        say "$RUN run: round $round of $ROUNDS"
        for entry in "${WORKLOADS[@]}"; do
            name=${entry%%|*}
            opts=${entry#*|}
            for target in "${TARGETS[@]}"; do
                if [[ $target == pgvigil-3node ]]; then
                    run_counting_reads "$name" "$opts"
                elif [[ $target == direct-standbys ]]; then
                    run_standbys "$name" "$opts"
                else
                    run_one "$name" "$target" "$opts"
                fi
            done
        done
    done
}

# Median of column $2 of file $1 ("" when the file is missing).
median() {
    [[ -f $1 ]] || return 0
    sort -g -k "$2,$2" "$1" | awk -v c="$2" '{v[NR] = $c}
        END {if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2}'
}

# awk functions of both tables: a "TPS / latency" cell, and the ratio of two TPS.
AWK_CELLS='
    function cell(t, l) { return t == "" ? "FAIL" : sprintf("%.0f / %.3f", t, l) }
    function ratio(a, b) {
        return (a == "" || a == "-" || b == "" || b == "-" || b == 0) ? "-" : sprintf("%.2f", a / b)
    }
'

# Largest value of column $2 of file $1 ("" when the file is missing or holds none).
maximum() {
    [[ -f $1 ]] || return 0
    awk -v c="$2" '$c != "-" && (m == "" || $c + 0 > m + 0) {m = $c} END {print m}' "$1"
}

report_single() {
    local entry name target
    echo
    echo "pgbench, ${ROUNDS} round(s) x ${DURATION} s per run, -j $THREADS, scale $SCALE; medians."
    echo "Cells: TPS / the proxy's CPU time per transaction in microseconds (user + system)."
    echo "pgb: PgBouncer, vig: pgvigil; -s: session pooling, -t: transaction pooling. v/p: pgvigil"
    echo "over PgBouncer in the same pool mode (TPS, then CPU). RSS: pgvigil's peak resident memory"
    echo "(VmHWM) after the workload's last run, MiB, session / transaction pooling."
    printf '%-20s %7s %14s %14s %14s %14s %11s %11s %11s\n' workload direct pgb-s pgb-t vig-s \
        vig-t "v/p-s" "v/p-t" RSS
    for entry in "${WORKLOADS[@]}"; do
        name=${entry%%|*}
        declare -A T=() C=() M=()
        for target in "${TARGETS[@]}"; do
            T[$target]=$(median "$WORK/runs/$RUN/$name.$target.results" 1)
            C[$target]=$(median "$WORK/runs/$RUN/$name.$target.results" 3)
            M[$target]=$(maximum "$WORK/runs/$RUN/$name.$target.results" 4)
        done
        awk -v name="$name" -v dt="${T[direct]}" \
            -v st="${T[pgbouncer-session]}" -v sc="${C[pgbouncer-session]}" \
            -v xt="${T[pgbouncer-transaction]}" -v xc="${C[pgbouncer-transaction]}" \
            -v vt="${T[pgvigil]}" -v vc="${C[pgvigil]}" -v vm="${M[pgvigil]}" \
            -v wt="${T[pgvigil-txn]}" -v wc="${C[pgvigil-txn]}" -v wm="${M[pgvigil-txn]}" \
            "$AWK_CELLS"'
            function tc(t, c) {
                return t == "" ? "FAIL" : sprintf("%.0f / %s", t, (c == "" || c == "-") ? "-" : c)
            }
            function pair(t1, t2, c1, c2) { return ratio(t1, t2) " " ratio(c1, c2) }
            function mib(k) { return (k == "" || k == "-") ? "-" : sprintf("%.0f", k / 1024) }
            BEGIN {
                printf "%-20s %7s %14s %14s %14s %14s %11s %11s %11s\n", name,
                    (dt == "" ? "FAIL" : sprintf("%.0f", dt)), tc(st, sc), tc(xt, xc), tc(vt, vc),
                    tc(wt, wc), pair(vt, st, vc, sc), pair(wt, xt, wc, xc), mib(vm) " / " mib(wm)
            }'
        unset T C M
    done
    # The issue's bound for named prepared statements: transaction pooling at least 0.9x of
    # session pooling, both pgvigil's.
    for entry in "${WORKLOADS[@]}"; do
        name=${entry%%|*}
        [[ $name == *prepared* ]] || continue
        awk -v name="$name" -v vt="$(median "$WORK/runs/$RUN/$name.pgvigil.results" 1)" \
            -v wt="$(median "$WORK/runs/$RUN/$name.pgvigil-txn.results" 1)" "$AWK_CELLS"'
            BEGIN { printf "%s: pgvigil in transaction over session pooling, TPS %s\n", name, ratio(wt, vt) }'
    done
}

report_txn() {
    local entry name target
    echo
    echo "Transaction pooling: pgbench, ${ROUNDS} round(s) x ${DURATION} s per run, -j $THREADS," \
        "scale $SCALE; medians."
    echo "Cells: TPS / average latency in ms. pgb-txn: PgBouncer, vigil-txn: pgvigil, both in" \
        "transaction pooling. CPU: the proxy's CPU time per transaction, in microseconds."
    echo "floor: a relay that only copies bytes (the CPU any proxy making the same socket calls" \
        "spends); f/p: its CPU over PgBouncer's."
    printf '%-21s %18s %18s %18s %9s %8s %8s %9s %8s %6s\n' workload direct pgb-txn vigil-txn \
        vigil/pgb "cpu pgb" "cpu vig" "cpu v/p" "cpu flr" "f/p"
    for entry in "${WORKLOADS[@]}"; do
        name=${entry%%|*}
        declare -A T=() L=() C=()
        for target in "${TARGETS[@]}"; do
            T[$target]=$(median "$WORK/runs/$RUN/$name.$target.results" 1)
            L[$target]=$(median "$WORK/runs/$RUN/$name.$target.results" 2)
            C[$target]=$(median "$WORK/runs/$RUN/$name.$target.results" 3)
        done
        awk -v name="$name" \
            -v dt="${T[direct]}" -v dl="${L[direct]}" \
            -v xt="${T[pgbouncer-transaction]}" -v xl="${L[pgbouncer-transaction]}" \
            -v xc="${C[pgbouncer-transaction]}" \
            -v vt="${T[pgvigil-txn]}" -v vl="${L[pgvigil-txn]}" -v vc="${C[pgvigil-txn]}" \
            -v fc="${C[floor]}" "$AWK_CELLS"'
            BEGIN {
                printf "%-21s %18s %18s %18s %9s %8s %8s %9s %8s %6s\n", name, cell(dt, dl),
                    cell(xt, xl), cell(vt, vl), ratio(vt, xt), (xc == "" ? "-" : xc),
                    (vc == "" ? "-" : vc), ratio(vc, xc), (fc == "" ? "-" : fc), ratio(fc, xc)
            }'
        unset T L C
    done
}

# The proxies' CPU time per transaction split into user and system time (medians), for the run
# under way: on loopback most of it is the kernel's socket work, which both proxies do alike.
report_cpu_split() {
    local entry name target user system
    echo
    echo "CPU time per transaction in microseconds, user / system (medians):"
    printf '%-21s' workload
    for target in "${TARGETS[@]}"; do
        [[ $target == direct ]] || printf ' %22s' "$target"
    done
    echo
    for entry in "${WORKLOADS[@]}"; do
        name=${entry%%|*}
        printf '%-21s' "$name"
        for target in "${TARGETS[@]}"; do
            [[ $target == direct ]] && continue
            user=$(median "$WORK/runs/$RUN/$name.$target.results" 5)
            system=$(median "$WORK/runs/$RUN/$name.$target.results" 6)
            printf ' %22s' "$([[ -n $user ]] && echo "$user / $system" || echo FAIL)"
        done
        echo
    done
}

report_split() {
    local entry name target
    echo
    echo "3-node read run: pgbench, ${ROUNDS} round(s) x ${DURATION} s per run, -j $THREADS," \
        "scale $SCALE; medians."
    echo "Cells: TPS / average latency in ms. pgb-txn: PgBouncer transaction pooling, on the" \
        "primary."
    echo "vigil-1n: pgvigil, primary only. vigil-3n: pgvigil, primary + 2 replicas," \
        "balance ${SPLIT_BALANCE:-not set (default)}," \
        "read_affinity ${SPLIT_AFFINITY:-not set (session)}."
    echo "dir-sb: the 2 replicas directly, no proxy (one pgbench each, at once, with half the"
    echo "clients and threads; TPS summed, latency averaged). dir-sb/dir: the machine's own"
    echo "replicas-over-primary TPS ratio, the floor to read vigil's 3n/1n against."
    printf '%-21s %18s %18s %18s %18s %18s %8s %12s %8s %10s\n' workload direct dir-sb pgb-txn \
        vigil-1n vigil-3n 3n/dir 3n/pgb-txn 3n/1n dir-sb/dir
    for entry in "${WORKLOADS[@]}"; do
        name=${entry%%|*}
        declare -A T=() L=()
        for target in "${TARGETS[@]}"; do
            T[$target]=$(median "$WORK/runs/$RUN/$name.$target.results" 1)
            L[$target]=$(median "$WORK/runs/$RUN/$name.$target.results" 2)
        done
        awk -v name="$name" \
            -v dt="${T[direct]}" -v dl="${L[direct]}" \
            -v st="${T[direct-standbys]}" -v sl="${L[direct-standbys]}" \
            -v xt="${T[pgbouncer-transaction]}" -v xl="${L[pgbouncer-transaction]}" \
            -v vt="${T[pgvigil]}" -v vl="${L[pgvigil]}" \
            -v wt="${T[pgvigil-3node]}" -v wl="${L[pgvigil-3node]}" "$AWK_CELLS"'
            BEGIN {
                printf "%-21s %18s %18s %18s %18s %18s %8s %12s %8s %10s\n", name, cell(dt, dl),
                    cell(st, sl), cell(xt, xl), cell(vt, vl), cell(wt, wl), ratio(wt, dt),
                    ratio(wt, xt), ratio(wt, vt), ratio(st, dt)
            }'
        unset T L
    done
    report_reads
}

# Prints each node's share and count of the transactions committed during every pgvigil-3node run.
report_reads() {
    local entry name r file
    echo
    echo "Transactions per node during each vigil-3n run (growth of sum(xact_commit) in each node's"
    echo "pg_stat_database): share / count; ${NODES[0]} is the primary. Nothing is subtracted: the"
    echo "counts include pgbench's set-up statements, and pgvigil's health probes as far as"
    echo "PostgreSQL has reported them (few: see run_counting_reads)."
    printf '%-21s %5s' workload round
    printf ' %16s' "${NODES[@]}"
    printf ' %12s\n' total
    for entry in "${WORKLOADS[@]}"; do
        name=${entry%%|*}
        for ((r = 1; r <= ROUNDS; r++)); do
            file=$WORK/runs/$RUN/$name.pgvigil-3node.$r.reads
            [[ -f $file ]] || continue
            awk -v name="$name" -v round="$r" '
                {n[NR] = $2; total += $2}
                END {
                    printf "%-21s %5s", name, round
                    for (i = 1; i <= NR; i++)
                        printf " %6.1f%% / %7d", (total > 0 ? 100 * n[i] / total : 0), n[i]
                    printf " %12d\n", total
                }' "$file"
        done
    done
}

# RUNS=memory: the memory_load client through each proxy, its lines kept for the report.
run_memory() {
    local target
    for target in pgvigil pgvigil-memory pgbouncer-transaction; do
        say "memory: a 256 MiB value through $target"
        # PgBouncer 1.18 was seen to hang on or after a 256 MiB CopyData: bounded.
        timeout 600 "$MEMORY_LOAD" --conn "$(app_conninfo "$target")" --pid "${PID[$target]}" --step large \
            --label "$target" 2>&1 | tee -a "$WORK/memory.txt" >&2 ||
            say "warning: the memory run through $target failed (the report shows where)"
    done
    say "memory: $MEMORY_CLIENTS idle clients through pgvigil-memory"
    "$MEMORY_LOAD" --conn "$(app_conninfo pgvigil-memory)" --pid "${PID[pgvigil-memory]}" \
        --step idle --clients "$MEMORY_CLIENTS" --label pgvigil-memory 2>&1 |
        tee -a "$WORK/memory.txt" >&2 || say "warning: the idle clients' memory run failed"
}

# The connection string of `app` to target $1.
app_conninfo() {
    printf 'host=127.0.0.1 port=%s user=%s password=%s dbname=%s' \
        "${PORT[$1]}" "$APP_USER" "$APP_PASSWORD" "$APP_DB"
}

report_memory() {
    echo
    echo "Memory (RUNS=memory): resident memory before each step and its peak during it"
    echo "(pgvigil: session pooling; pgvigil-memory: transaction pooling over 20 connections)"
    cat "$WORK/memory.txt"
}

main() {
    local node
    case $RUNS in
    single | split | txn | memory | all) ;;
    *) die "RUNS must be single, split, txn, memory or all" ;;
    esac
    case $SPLIT_BALANCE in
    "" | least_connections | round_robin | random) ;;
    *) die "SPLIT_BALANCE must be least_connections, round_robin or random" ;;
    esac
    case $SPLIT_AFFINITY in
    "" | unit | session) ;;
    *) die "SPLIT_AFFINITY must be unit or session" ;;
    esac
    [[ $DURATION =~ ^[1-9][0-9]*$ ]] || die "DURATION must be a positive integer (seconds)"
    [[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "ROUNDS must be a positive integer"
    # 64 clients need 64 sockets in pgbench and two per client in each proxy.
    ulimit -n "$(ulimit -Hn)" 2>/dev/null || ulimit -n 4096 2>/dev/null ||
        say "warning: could not raise the open file limit (now $(ulimit -n))"
    check_tools
    build_pgvigil
    make_work_dir
    start_postgres
    start_pgvigil pgvigil "" pg1
    if wants single; then
        start_pgbouncer session
    fi
    start_pgbouncer transaction
    if wants single || wants txn; then
        POOL_MODE=transaction start_pgvigil pgvigil-txn "" pg1
    fi
    if wants txn; then
        build_floor_relay
        start_floor
    fi
    if wants memory; then
        build_memory_load
        POOL_MODE=transaction POOL_SIZE=20 MAX_CLIENT_CONN=$((MEMORY_CLIENTS + 100)) \
            start_pgvigil pgvigil-memory "" pg1
    fi
    init_pgbench
    if wants single; then
        use_run single
        warm_up
        run_rounds
    fi
    if wants txn; then
        use_run txn
        warm_up
        run_rounds
    fi
    if wants memory; then
        run_memory
    fi
    if wants split; then
        for node in "${NODES[@]:1}"; do
            start_replica "$node"
        done
        wait_replayed
        READ_AFFINITY=$SPLIT_AFFINITY start_pgvigil pgvigil-3node "$SPLIT_BALANCE" "${NODES[@]}"
        use_run split
        warm_up
        run_rounds
    fi
    if wants single; then
        use_run single
        report_single
        report_cpu_split
    fi
    if wants split; then
        use_run split
        report_split
    fi
    if wants txn; then
        use_run txn
        report_txn
        report_cpu_split
    fi
    if wants memory; then
        report_memory
    fi
    if ((FAILED_RUNS > 0)); then
        die "$FAILED_RUNS pgbench run(s) failed (shown above): medians exclude them; FAIL: no run succeeded"
    fi
}

main "$@"
