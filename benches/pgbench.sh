#!/usr/bin/env bash
# Macro benchmark: pgbench against PostgreSQL directly, through PgBouncer (session and
# transaction pooling) and through pgvigil, in interleaved rounds, reporting medians.
#
# Usage: benches/pgbench.sh            (from anywhere; run as root or as a user who can run initdb)
#   DURATION=10   seconds per pgbench run (integer)
#   ROUNDS=3      interleaved rounds (in each: every workload, every target in turn)
#   SCALE=10      pgbench scale factor, initialised once
#   PGVIGIL_BIN   use this pgvigil binary instead of building target/release/pgvigil
#   PG_BIN        PostgreSQL server bin dir (default: newest /usr/lib/postgresql/*/bin)
#
# Expected full runtime with the defaults: 8 workloads x 4 targets x 3 rounds x 10 s = 16 min of
# pgbench, about 18 min with connection set-up, plus ~1 min for cluster + init at scale 10, plus
# the release build (a few minutes when target/release is cold). Run it on a quiet machine.
#
# The cluster is built here (initdb + pg_ctl, as the `postgres` OS user when root) rather than with
# `pgvigil demo`, to get max_connections for every target's pool at once and a pgvigil config with
# [pool] max_size = 100 (the demo uses the default 20). fsync stays on; synchronous_commit is off so
# that the TPC-B-like workload measures the proxies rather than the disk's flush latency.
set -euo pipefail

DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-3}
SCALE=${SCALE:-10}
THREADS=2
APP_USER=app
APP_PASSWORD=app-secret
APP_DB=app
TARGETS=(direct pgbouncer-session pgbouncer-transaction pgvigil)
# name|pgbench options (besides -T, -j and the connection)
WORKLOADS=(
    "select-simple-c1|-S -M simple -c 1"
    "select-simple-c16|-S -M simple -c 16"
    "select-simple-c64|-S -M simple -c 64"
    "select-extended-c1|-S -M extended -c 1"
    "select-extended-c16|-S -M extended -c 16"
    "select-extended-c64|-S -M extended -c 64"
    "tpcb-like-c16|-M simple -c 16"
    "connect-select-c8|-C -S -M simple -c 8"
)

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=""
PGVIGIL_PID=""
PG_STARTED=""
declare -A PORT=()
FAILED_RUNS=0

say() { printf '%s %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { say "error: $*"; exit 1; }

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
    for pidfile in "$WORK"/pgbouncer-*/pgbouncer.pid; do
        [[ -f $pidfile ]] && kill "$(cat "$pidfile")" 2>/dev/null
    done
    if [[ -n $PGVIGIL_PID ]]; then
        kill -TERM "$PGVIGIL_PID" 2>/dev/null
        wait "$PGVIGIL_PID" 2>/dev/null
    fi
    if [[ -n $PG_STARTED ]]; then
        as_server_user "$PG_BIN/pg_ctl" -D "$WORK/pg/data" -m fast -w stop >/dev/null 2>&1
    fi
    # Give pgbouncer a moment to exit before its directory goes away.
    sleep 0.5
    [[ -n $WORK && -d $WORK ]] && rm -rf "$WORK"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

port_is_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Picks a free loopback port at or above $1 that no target uses yet.
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

check_tools() {
    local bin
    bin=${PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)}
    [[ -n $bin ]] || bin=$(dirname "$(command -v initdb || echo /nonexistent/initdb)")
    [[ -x $bin/initdb && -x $bin/pg_ctl ]] || die "PostgreSQL server binaries not found (set PG_BIN)"
    PG_BIN=$bin
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
    PGVIGIL_BIN=$REPO/target/release/pgvigil
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
    local data=$WORK/pg/data
    say "initdb and start PostgreSQL on port ${PORT[direct]}"
    as_server_user "$PG_BIN/initdb" -D "$data" -U postgres --auth-local=trust \
        --auth-host=scram-sha-256 -E UTF8 --locale=C >"$WORK/initdb.log" 2>&1 ||
        { cat "$WORK/initdb.log" >&2; die "initdb failed"; }
    # The superuser (setup only) may use trust; `app` logs in with SCRAM everywhere, as through
    # the proxies.
    as_server_user tee "$data/pg_hba.conf" >/dev/null <<EOF
local all all trust
host all postgres 127.0.0.1/32 trust
host all all 127.0.0.1/32 scram-sha-256
EOF
    as_server_user tee -a "$data/postgresql.conf" >/dev/null <<EOF
listen_addresses = '127.0.0.1'
port = ${PORT[direct]}
unix_socket_directories = '$WORK/pg'
max_connections = 400
shared_buffers = 128MB
synchronous_commit = off
EOF
    as_server_user "$PG_BIN/pg_ctl" -D "$data" -l "$WORK/pg/postgres.log" -w -t 60 start \
        >/dev/null || { tail -n 20 "$WORK/pg/postgres.log" >&2; die "PostgreSQL did not start"; }
    PG_STARTED=1
    psql -h 127.0.0.1 -p "${PORT[direct]}" -U postgres -d postgres -XAtq -v ON_ERROR_STOP=1 \
        -c "CREATE ROLE $APP_USER LOGIN PASSWORD '$APP_PASSWORD'" \
        -c "CREATE DATABASE $APP_DB OWNER $APP_USER" >/dev/null || die "cannot create role/db"
    wait_ready "${PORT[direct]}" PostgreSQL || die "PostgreSQL refuses app"
}

start_pgvigil() {
    PORT[pgvigil]=$(pick_port 26432)
    cat >"$WORK/pgvigil.toml" <<EOF
listen = "127.0.0.1:${PORT[pgvigil]}"

[pool]
max_size = 100

[[nodes]]
name = "pg1"
host = "127.0.0.1"
port = ${PORT[direct]}

[[users]]
name = "$APP_USER"
password = "$APP_PASSWORD"
auth = "scram-sha-256"
EOF
    say "start pgvigil on port ${PORT[pgvigil]}"
    PGVIGIL_LOG=warn "$PGVIGIL_BIN" serve --config "$WORK/pgvigil.toml" >"$WORK/pgvigil.log" 2>&1 &
    PGVIGIL_PID=$!
    wait_ready "${PORT[pgvigil]}" pgvigil ||
        { tail -n 20 "$WORK/pgvigil.log" >&2; die "pgvigil did not start"; }
}

# Starts one PgBouncer in pool mode $1 (session or transaction) as the server user.
start_pgbouncer() {
    local mode=$1 dir=$WORK/pgbouncer-$1 port
    port=$(pick_port 27432)
    PORT[pgbouncer-$mode]=$port
    as_server_user tee "$dir/userlist.txt" >/dev/null <<<"\"$APP_USER\" \"$APP_PASSWORD\""
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
EOF
    say "start pgbouncer ($mode pooling) on port $port"
    as_server_user "$PGBOUNCER" -d "$dir/pgbouncer.ini" ||
        { tail -n 20 "$dir/pgbouncer.log" >&2 || true; die "pgbouncer ($mode) did not start"; }
    wait_ready "$port" "pgbouncer ($mode)" ||
        { tail -n 20 "$dir/pgbouncer.log" >&2 || true; die "pgbouncer ($mode) is not usable"; }
}

init_pgbench() {
    say "pgbench -i -s $SCALE (directly)"
    PGPASSWORD=$APP_PASSWORD "$PGBENCH" -i -s "$SCALE" -q -h 127.0.0.1 -p "${PORT[direct]}" \
        -U "$APP_USER" "$APP_DB" >"$WORK/init.log" 2>&1 ||
        { cat "$WORK/init.log" >&2; die "pgbench -i failed"; }
}

# One pgbench run: workload options $3 against target $2; appends "tps latency_ms" to the
# results of workload $1 and target $2, or counts a failure and shows why.
run_one() {
    local workload=$1 target=$2 opts=$3 out status=0
    out=$WORK/runs/$workload.$target.$round.log
    # shellcheck disable=SC2086 # $opts holds several options on purpose
    PGPASSWORD=$APP_PASSWORD "$PGBENCH" -h 127.0.0.1 -p "${PORT[$target]}" -U "$APP_USER" \
        -T "$DURATION" -j "$THREADS" $opts "$APP_DB" >"$out" 2>&1 || status=$?
    local tps latency failed
    tps=$(awk '/^tps = /{print $3; exit}' "$out")
    latency=$(awk '/^latency average = /{print $4; exit}' "$out")
    failed=$(awk -F': ' '/^number of failed transactions/{split($2, a, " "); print a[1]; exit}' "$out")
    if [[ $status -ne 0 || -z $tps || -z $latency || ${failed:-0} != 0 ]]; then
        FAILED_RUNS=$((FAILED_RUNS + 1))
        say "FAILED: $workload on $target (exit $status, failed transactions ${failed:-?}):"
        grep -v '^progress' "$out" | tail -n 15 >&2
        return
    fi
    echo "$tps $latency" >>"$WORK/runs/$workload.$target.results"
    say "  $workload on $target: tps $tps, latency $latency ms"
}

# Fills every pool before measuring, so that no target pays for opening server connections in
# round 1 and not later; the results are not kept and a failure is only a warning.
warm_up() {
    local target
    for target in "${TARGETS[@]}"; do
        say "warm-up: 64 clients on $target"
        PGPASSWORD=$APP_PASSWORD "$PGBENCH" -h 127.0.0.1 -p "${PORT[$target]}" -U "$APP_USER" \
            -T 2 -j "$THREADS" -c 64 -S "$APP_DB" >"$WORK/runs/warm-up.$target.log" 2>&1 ||
            say "warning: warm-up on $target failed: $(tail -n 1 "$WORK/runs/warm-up.$target.log")"
    done
}

run_rounds() {
    local entry name opts target
    for ((round = 1; round <= ROUNDS; round++)); do
        say "round $round of $ROUNDS"
        for entry in "${WORKLOADS[@]}"; do
            name=${entry%%|*}
            opts=${entry#*|}
            for target in "${TARGETS[@]}"; do
                run_one "$name" "$target" "$opts"
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

report() {
    local entry name target tps lat
    echo
    echo "pgbench, ${ROUNDS} round(s) x ${DURATION} s per run, -j $THREADS, scale $SCALE; medians."
    echo "Cells: TPS / average latency in ms. pgb-sess/pgb-txn: PgBouncer session/transaction pooling."
    printf '%-21s %18s %18s %18s %18s %9s %16s\n' workload direct pgb-sess pgb-txn pgvigil \
        vigil/dir "vigil/best-pgb"
    for entry in "${WORKLOADS[@]}"; do
        name=${entry%%|*}
        declare -A T=() L=()
        for target in "${TARGETS[@]}"; do
            T[$target]=$(median "$WORK/runs/$name.$target.results" 1)
            L[$target]=$(median "$WORK/runs/$name.$target.results" 2)
        done
        awk -v name="$name" \
            -v dt="${T[direct]}" -v dl="${L[direct]}" \
            -v st="${T[pgbouncer-session]}" -v sl="${L[pgbouncer-session]}" \
            -v xt="${T[pgbouncer-transaction]}" -v xl="${L[pgbouncer-transaction]}" \
            -v vt="${T[pgvigil]}" -v vl="${L[pgvigil]}" '
            function cell(t, l) { return t == "" ? "FAIL" : sprintf("%.0f / %.3f", t, l) }
            function ratio(a, b) { return (a == "" || b == "" || b == 0) ? "-" : sprintf("%.2f", a / b) }
            BEGIN {
                if (st == "" && xt == "") { best = ""; which = "" }
                else if (xt == "" || (st != "" && st + 0 >= xt + 0)) { best = st; which = " (sess)" }
                else { best = xt; which = " (txn)" }
                bestcell = ratio(vt, best); if (bestcell != "-") bestcell = bestcell which
                printf "%-21s %18s %18s %18s %18s %9s %16s\n", name, cell(dt, dl), cell(st, sl),
                    cell(xt, xl), cell(vt, vl), ratio(vt, dt), bestcell
            }'
        unset T L
    done
}

main() {
    [[ $DURATION =~ ^[1-9][0-9]*$ ]] || die "DURATION must be a positive integer (seconds)"
    [[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "ROUNDS must be a positive integer"
    # 64 clients need 64 sockets in pgbench and two per client in each proxy.
    ulimit -n "$(ulimit -Hn)" 2>/dev/null || ulimit -n 4096 2>/dev/null ||
        say "warning: could not raise the open file limit (now $(ulimit -n))"
    check_tools
    build_pgvigil
    make_work_dir
    start_postgres
    start_pgvigil
    start_pgbouncer session
    start_pgbouncer transaction
    init_pgbench
    warm_up
    run_rounds
    report
    if ((FAILED_RUNS > 0)); then
        die "$FAILED_RUNS pgbench run(s) failed (shown above): medians exclude them; FAIL: no run succeeded"
    fi
}

main "$@"
