#!/usr/bin/env bash
# Failover benchmark: how long writes are unavailable when the primary fails, and how many
# acknowledged writes the new primary lacks, through pgvigil and through pgpool-II.
#
# Every run builds a fresh 3-node cluster (primary + 2 streaming standbys with slots, fsync on,
# wal_receiver_timeout = wal_sender_timeout = 5s, wal_receiver_status_interval = 1s) with the
# failover_cluster example, puts one proxy in front of it, starts two writers through the proxy
# (the failover_writer example, one insert every 20 ms each: `keep` holds one connection and
# reconnects only when it breaks, `per-insert` connects for every insert), lets them write, then
# injects the fault into the primary:
#   kill9    SIGKILL of the postmaster and all its children (a crash: connections are refused)
#   sigstop  SIGSTOP of them all (a hung host: connections are accepted and never served)
# and tells the writers the moment (SIGUSR1). A writer stops SETTLE s after its first write that
# succeeded after the fault, or MAX_WAIT s after the fault if none did. Then, per writer:
#   window   first ack after the fault - last ack before it (s); "none" if writes never resumed
#            within MAX_WAIT s (counted as infinite in the median)
#   lost     acknowledged ids missing on the new primary (the surviving node not in recovery);
#            "-" when no node was promoted
# and, per run, the proxy's own account:
#   failover pgvigil's "failover complete" log line minus the moment the fault landed (s): the
#            coordinator's failover time, shown beside each writer's window so that the time a
#            client waits beyond it is visible; "-" for pgpool-II (its log has whole seconds
#            only) and when the line is missing
# Health settings are the same for both proxies: probe every 1 s, 1 s timeout, the node is down
# after 2 failed probes (pgvigil: health.failures = 2; pgpool-II: health_check_max_retries = 1,
# i.e. the first check and one retry 1 s later).
#
# Usage: benches/failover.sh            (as root: the servers and pgpool-II run as `postgres`)
#   RUNS=5                runs per (proxy, fault, replication)
#   PROXIES="pgvigil pgpool"  which proxies; pgpool is skipped with a warning when pgpool-II is
#                         not installed and `apt-get install -y pgpool2` fails
#   FAULTS="kill9 sigstop"
#   REPLICATION="async sync"  sync: synchronous_standby_names = '*', synchronous_commit = on
#   MAX_WAIT=60           seconds after the fault a run waits for writes to resume
#   SETTLE=2              seconds of writing after the first write that succeeded after the fault
#   WARMUP=3              seconds of writing before the fault
#   WRITER_TIMEOUT_MS=2000  bound on one insert attempt, connecting included; a timed-out attempt
#                         drops its connection
#   PGPOOL_SR_CHECK_PERIOD=10  pgpool-II's sr_check_period (its default). With 1, writes through
#                         pgpool-II never resumed after a SIGSTOP (3 runs of 3, bounds of 60, 120
#                         and 300 s): its main process kept looping in find_primary_node_repeatedly
#                         with no child serving clients, while the sr_check worker sat blocked in a
#                         socket read with a connection open to the frozen primary. With 10, all
#                         10 runs resumed.
#   KEEP=1                keep the work directory (logs of every run) instead of deleting it
#   PGVIGIL_BIN, WRITER_BIN, CLUSTER_BIN  use these binaries instead of building them (release)
#   PG_BIN                PostgreSQL bin dir (default: newest /usr/lib/postgresql/*/bin)
#
# pgpool-II runs in streaming-replication mode without load balancing, with
# failover_on_backend_error = on; its failover_command promotes the node pgpool-II names as the new
# main node (%m: the lowest live node id, where pgvigil picks the standby furthest in the WAL),
# creates the other standby's slot there and repoints that standby to it.
#
# Runtime: ~25 s of set-up, writing and teardown per run, plus the time to recover (up to
# MAX_WAIT): with the defaults, 2 proxies x 2 faults x 2 modes x 5 runs = 40 runs took 16 min
# when every run recovered; add up to MAX_WAIT for every run that does not.
set -euo pipefail

RUNS=${RUNS:-5}
PROXIES=${PROXIES:-"pgvigil pgpool"}
FAULTS=${FAULTS:-"kill9 sigstop"}
REPLICATION=${REPLICATION:-"async sync"}
MAX_WAIT=${MAX_WAIT:-60}
SETTLE=${SETTLE:-2}
WARMUP=${WARMUP:-3}
WRITER_TIMEOUT_MS=${WRITER_TIMEOUT_MS:-2000}
KEEP=${KEEP:-}
PGPOOL_SR_CHECK_PERIOD=${PGPOOL_SR_CHECK_PERIOD:-10}
WRITERS=(keep per-insert)
APP_USER=app
APP_PASSWORD=app-secret
APP_DB=app
ADMIN_USER=pgvigil_admin
ADMIN_PASSWORD=admin-secret
SERVER_USER=postgres

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=""
RESULTS=""
# What the run under way started; the trap stops all of it.
CLUSTER_PID=""
NODE_PIDS=()
PROXY_PID=""
PROXY_KIND=""
WRITER_PIDS=()
declare -A PORT=()
NODE_NAMES=()

say() { printf '%s %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { say "error: $*"; exit 1; }

cleanup() {
    local status=$?
    trap - EXIT INT TERM
    set +e
    stop_run_processes
    if [[ -n $WORK && -d $WORK ]]; then
        if [[ -n $KEEP ]]; then
            say "work directory kept: $WORK"
        else
            rm -rf "$WORK"
        fi
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Whether $1 is a live process.
alive() { [[ -n $1 ]] && kill -0 "$1" 2>/dev/null; }

# Waits up to $2 s for process $1 to exit; returns 1 if it is still there.
wait_gone() {
    local pid=$1 deadline=$((SECONDS + $2))
    while alive "$pid"; do
        ((SECONDS < deadline)) || return 1
        sleep 0.1
    done
    wait "$pid" 2>/dev/null || true
}

# Process $1's descendants, children before their own children.
descendants() {
    local child
    for child in $(pgrep -P "$1"); do
        echo "$child"
        descendants "$child"
    done
}

# SIGKILLs process $1 and all its descendants, gathered first since they are re-parented once
# their parent dies (stopped ones die too: SIGKILL needs no SIGCONT).
kill_tree() {
    local - pid=$1
    set +e
    alive "$pid" || return 0
    # shellcheck disable=SC2046 # one pid a word
    kill -KILL "$pid" $(descendants "$pid") 2>/dev/null
    wait "$pid" 2>/dev/null
    return 0
}

# Stops the writers, the proxy and the cluster of the run under way, bounded in time; whatever
# outlives its grace is killed, the servers included.
stop_run_processes() {
    local - pid
    set +e
    for pid in "${WRITER_PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null
    done
    for pid in "${WRITER_PIDS[@]}"; do
        wait_gone "$pid" 5 || kill_tree "$pid"
    done
    WRITER_PIDS=()
    if alive "$PROXY_PID"; then
        # pgvigil stops on SIGTERM; pgpool-II's fast shutdown is SIGINT (SIGTERM waits for clients).
        if [[ $PROXY_KIND == pgpool ]]; then kill -INT "$PROXY_PID"; else kill -TERM "$PROXY_PID"; fi
        wait_gone "$PROXY_PID" 15 || kill_tree "$PROXY_PID"
    fi
    PROXY_PID=""
    if alive "$CLUSTER_PID"; then
        # The cluster process thaws, stops and deletes its nodes on quit, EOF or SIGTERM.
        echo quit >&7 2>/dev/null
        exec 7>&-
        wait_gone "$CLUSTER_PID" 60 || { kill -TERM "$CLUSTER_PID"; wait_gone "$CLUSTER_PID" 30; }
    fi
    exec 7>&-
    # What outlived that: postmasters (and their children) by pid, then the cluster process.
    for pid in "${NODE_PIDS[@]}"; do
        [[ $(cat "/proc/$pid/comm" 2>/dev/null) == postgres ]] && kill_tree "$pid"
    done
    kill_tree "$CLUSTER_PID"
    CLUSTER_PID=""
    NODE_PIDS=()
    return 0
}

port_is_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# A free loopback port at or above $1 that nothing of this run uses yet.
pick_port() {
    local port=$1
    while ! port_is_free "$port" || [[ " ${PORT[*]} " == *" $port "* ]]; do
        port=$((port + 1))
    done
    echo "$port"
}

# Runs a command as the server user (pgpool-II runs as it, like the servers). setpriv execs, so
# that started with `&` (and not through a function, which would fork a subshell), $! is the
# command's own pid.
AS_SERVER_USER=(setpriv --reuid="$SERVER_USER" --regid="$SERVER_USER" --init-groups --)

# Runs query $2 as superuser `postgres` directly on the node on port $1, with a 3 s connect
# bound (a frozen node accepts and never answers: callers must not ask it).
node_sql() {
    psql "host=127.0.0.1 port=$1 user=postgres dbname=$APP_DB connect_timeout=3" -XAtq \
        -v ON_ERROR_STOP=1 -c "$2"
}

# Waits up to $3 s for a line matching regex $2 in file $1 while process $4 lives.
wait_line() {
    local file=$1 regex=$2 deadline=$((SECONDS + $3)) pid=$4
    until grep -Eq "$regex" "$file" 2>/dev/null; do
        alive "$pid" || return 1
        ((SECONDS < deadline)) || return 1
        sleep 0.02
    done
}

# Waits up to 30 s until `app` can run a query on port $1 (through a proxy).
wait_ready() {
    local port=$1 deadline=$((SECONDS + 30))
    until PGPASSWORD=$APP_PASSWORD psql "host=127.0.0.1 port=$port user=$APP_USER \
dbname=$APP_DB connect_timeout=2" -XAtqc 'SELECT 1' >/dev/null 2>&1; do
        ((SECONDS < deadline)) || return 1
        sleep 0.3
    done
}

check_tools() {
    local bin proxy wanted=()
    bin=${PG_BIN:-$(compgen -G '/usr/lib/postgresql/*/bin' | sort -V | tail -n 1 || true)}
    [[ -n $bin && -x $bin/postgres ]] || die "PostgreSQL server binaries not found (set PG_BIN)"
    PG_BIN=$bin
    command -v psql >/dev/null || die "psql not found"
    [[ $(id -u) -eq 0 ]] || die "run as root: the servers and pgpool-II run as '$SERVER_USER'"
    id "$SERVER_USER" >/dev/null 2>&1 || die "no '$SERVER_USER' OS user"
    for proxy in $PROXIES; do
        case $proxy in
        pgvigil) wanted+=(pgvigil) ;;
        pgpool)
            if ! command -v pgpool >/dev/null && [[ ! -x /usr/sbin/pgpool ]]; then
                say "installing pgpool-II (apt-get install -y pgpool2)"
                DEBIAN_FRONTEND=noninteractive apt-get install -y pgpool2 >"/tmp/failbench-apt.log" 2>&1 ||
                    say "warning: apt-get install pgpool2 failed (/tmp/failbench-apt.log): pgpool-II skipped"
            fi
            if command -v pgpool >/dev/null || [[ -x /usr/sbin/pgpool ]]; then
                PGPOOL=$(command -v pgpool || echo /usr/sbin/pgpool)
                wanted+=(pgpool)
            fi
            ;;
        *) die "unknown proxy '$proxy' in PROXIES (pgvigil, pgpool)" ;;
        esac
    done
    ((${#wanted[@]} > 0)) || die "no proxy left to measure"
    PROXIES="${wanted[*]}"
}

build() {
    local target=$REPO/target/release
    [[ -n ${CARGO_TARGET_DIR:-} ]] && target=$CARGO_TARGET_DIR/release
    if [[ -z ${PGVIGIL_BIN:-} || -z ${WRITER_BIN:-} || -z ${CLUSTER_BIN:-} ]]; then
        say "building pgvigil and the benchmark's examples (release)"
        (cd "$REPO" && cargo build --release --bin pgvigil --example failover_writer \
            --example failover_cluster) || die "cargo build --release failed"
    fi
    PGVIGIL_BIN=${PGVIGIL_BIN:-$target/pgvigil}
    WRITER_BIN=${WRITER_BIN:-$target/examples/failover_writer}
    CLUSTER_BIN=${CLUSTER_BIN:-$target/examples/failover_cluster}
    local bin
    for bin in "$PGVIGIL_BIN" "$WRITER_BIN" "$CLUSTER_BIN"; do
        [[ -x $bin ]] || die "$bin is not executable"
    done
}

# Starts a fresh cluster in run directory $1, synchronous when $2 is sync; fills PORT[pgN],
# NODE_NAMES and NODE_PIDS, and opens fd 7 to its commands.
start_cluster() {
    local dir=$1 repl=$2 name port pid word
    local -a flags=()
    [[ $repl == sync ]] && flags=(--sync)
    mkfifo "$dir/cluster.cmd"
    "$CLUSTER_BIN" --dir "$dir/c" "${flags[@]}" <"$dir/cluster.cmd" >"$dir/cluster.out" \
        2>"$dir/cluster.err" &
    CLUSTER_PID=$!
    exec 7>"$dir/cluster.cmd"
    wait_line "$dir/cluster.out" '^ready$' 180 "$CLUSTER_PID" ||
        { tail -n 20 "$dir/cluster.err" >&2; die "the cluster did not start ($dir)"; }
    NODE_NAMES=()
    while read -r word name port pid; do
        [[ $word == node ]] || continue
        NODE_NAMES+=("$name")
        PORT[$name]=$port
        NODE_PIDS+=("$pid")
    done <"$dir/cluster.out"
    ((${#NODE_NAMES[@]} == 3)) || die "expected 3 nodes in $dir/cluster.out"
}

create_tables() {
    local primary=${PORT[${NODE_NAMES[0]}]} writer table sql=""
    for writer in "${WRITERS[@]}"; do
        table=writes_${writer//-/_}
        sql+="CREATE TABLE $table (id bigint PRIMARY KEY); ALTER TABLE $table OWNER TO $APP_USER; "
    done
    node_sql "$primary" "$sql" >/dev/null || die "cannot create the tables"
}

# Starts pgvigil in front of the cluster with the benchmark's health settings; sets PROXY_PID and
# PORT[proxy].
start_pgvigil() {
    local dir=$1 name config=$1/pgvigil.toml
    PORT[proxy]=$(pick_port 26432)
    {
        printf 'listen = "127.0.0.1:%s"\n' "${PORT[proxy]}"
        printf '\n[health]\ninterval = "1s"\ntimeout = "1s"\nfailures = 2\n'
        printf 'user = "%s"\npassword = "%s"\n' "$ADMIN_USER" "$ADMIN_PASSWORD"
        printf '\n[failover]\nstate_dir = "%s"\n' "$dir/pgvigil-state"
        for name in "${NODE_NAMES[@]}"; do
            printf '\n[[nodes]]\nname = "%s"\nhost = "127.0.0.1"\nport = %s\n' \
                "$name" "${PORT[$name]}"
        done
        printf '\n[[users]]\nname = "%s"\npassword = "%s"\nauth = "scram-sha-256"\n' \
            "$APP_USER" "$APP_PASSWORD"
    } >"$config"
    PGVIGIL_LOG=${PGVIGIL_LOG:-info} "$PGVIGIL_BIN" serve --config "$config" \
        >"$dir/proxy.log" 2>&1 7>&- &
    PROXY_PID=$!
    PROXY_KIND=pgvigil
    wait_ready "${PORT[proxy]}" ||
        { tail -n 20 "$dir/proxy.log" >&2; die "pgvigil did not start ($dir)"; }
}

# The failover_command of pgpool-II: promote the node pgpool-II chose (%m, the lowest live node
# id), create the other standbys' slots on it and repoint them to it.
write_pgpool_failover_script() {
    local dir=$1 script=$1/pgpool/failover.sh name
    {
        cat <<EOF
#!/usr/bin/env bash
# Called by pgpool-II as: failover.sh %d %m %P (failed node, new main node, old primary node).
set -u
failed=\$1 new=\$2 old_primary=\$3
log() { echo "\$(date +%H:%M:%S.%3N) failover.sh: \$*" >>"$dir/pgpool/failover.log"; }
sql() {
    psql "host=127.0.0.1 port=\$1 user=postgres dbname=postgres connect_timeout=2" -XAtq \\
        -v ON_ERROR_STOP=1 -c "\$2" >>"$dir/pgpool/failover.log" 2>&1
}
EOF
        printf 'names=(%s)\nports=(' "${NODE_NAMES[*]}"
        for name in "${NODE_NAMES[@]}"; do printf ' %s' "${PORT[$name]}"; done
        printf ' )\n'
        cat <<'EOF'
log "called: failed=$failed new=$new old_primary=$old_primary"
if [[ $failed != "$old_primary" ]]; then
    log "a standby failed: nothing to do"
    exit 0
fi
if ((new < 0)); then
    log "no node left to promote"
    exit 1
fi
sql "${ports[new]}" "SELECT pg_promote(wait => true, wait_seconds => 30)" || log "promote failed"
log "promoted ${names[new]}"
for i in "${!ports[@]}"; do
    ((i == failed || i == new)) && continue
    sql "${ports[new]}" "SELECT pg_create_physical_replication_slot('${names[i]}')" ||
        log "slot for ${names[i]} not created"
    sql "${ports[i]}" "ALTER SYSTEM SET primary_conninfo = 'host=127.0.0.1 port=${ports[new]} user=postgres application_name=${names[i]}'" &&
        sql "${ports[i]}" "SELECT pg_reload_conf()" || log "repointing ${names[i]} failed"
    log "repointed ${names[i]}"
done
exit 0
EOF
    } >"$script"
    chmod 0755 "$script"
}

# Starts pgpool-II (streaming-replication mode, no load balancing) with the benchmark's health
# settings; sets PROXY_PID and PORT[proxy].
start_pgpool() {
    local dir=$1 p=$1/pgpool i name
    mkdir -p "$p"
    PORT[proxy]=$(pick_port 27432)
    PORT[pcp]=$(pick_port 28432)
    write_pgpool_failover_script "$dir"
    {
        cat <<EOF
backend_clustering_mode = 'streaming_replication'
listen_addresses = '127.0.0.1'
port = ${PORT[proxy]}
socket_dir = '$p'
pcp_listen_addresses = '127.0.0.1'
pcp_port = ${PORT[pcp]}
pcp_socket_dir = '$p'
wd_ipc_socket_dir = '$p'
pid_file_name = '$p/pgpool.pid'
logdir = '$p'
log_destination = 'stderr'
enable_pool_hba = on
pool_passwd = 'pool_passwd'
num_init_children = 32
max_pool = 4
load_balance_mode = off
sr_check_period = $PGPOOL_SR_CHECK_PERIOD
sr_check_user = '$ADMIN_USER'
sr_check_password = '$ADMIN_PASSWORD'
sr_check_database = 'postgres'
health_check_period = 1
health_check_timeout = 1
health_check_max_retries = 1
health_check_retry_delay = 1
health_check_user = '$ADMIN_USER'
health_check_password = '$ADMIN_PASSWORD'
health_check_database = 'postgres'
failover_on_backend_error = on
failover_command = '$p/failover.sh %d %m %P'
follow_primary_command = ''
use_watchdog = off
memory_cache_enabled = off
EOF
        # A script sourcing this one may add settings (later ones win) and files in $p.
        if declare -F pgpool_extra_setup >/dev/null; then pgpool_extra_setup "$dir"; fi
        i=0
        for name in "${NODE_NAMES[@]}"; do
            cat <<EOF
backend_hostname$i = '127.0.0.1'
backend_port$i = ${PORT[$name]}
backend_weight$i = 1
backend_data_directory$i = '$dir/c/$name'
backend_flag$i = 'ALLOW_TO_FAILOVER'
backend_application_name$i = '$name'
EOF
            i=$((i + 1))
        done
    } >"$p/pgpool.conf"
    printf 'local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\n' >"$p/pool_hba.conf"
    printf '%s:TEXT%s\n' "$APP_USER" "$APP_PASSWORD" >"$p/pool_passwd"
    [[ -e $p/pcp.conf ]] || : >"$p/pcp.conf"
    chown -R "$SERVER_USER": "$p"
    chmod 0600 "$p/pool_passwd"
    "${AS_SERVER_USER[@]}" "$PGPOOL" -n -D -f "$p/pgpool.conf" -a "$p/pool_hba.conf" -F "$p/pcp.conf" \
        >"$dir/proxy.log" 2>&1 7>&- &
    PROXY_PID=$!
    PROXY_KIND=pgpool
    wait_ready "${PORT[proxy]}" ||
        { tail -n 20 "$dir/proxy.log" >&2; die "pgpool-II did not start ($dir)"; }
}

start_writers() {
    local dir=$1 writer
    for writer in "${WRITERS[@]}"; do
        "$WRITER_BIN" --conn "host=127.0.0.1 port=${PORT[proxy]} user=$APP_USER \
password=$APP_PASSWORD dbname=$APP_DB" --table "writes_${writer//-/_}" --mode "$writer" \
            --timeout-ms "$WRITER_TIMEOUT_MS" --max-wait "$MAX_WAIT" --settle "$SETTLE" \
            --duration $((MAX_WAIT + WARMUP + 120)) >"$dir/writer-$writer.out" \
            2>"$dir/writer-$writer.err" 7>&- &
        WRITER_PIDS+=("$!")
    done
}

# Waits until every writer has an ack, then WARMUP s.
warm_up() {
    local dir=$1 writer i=0
    for writer in "${WRITERS[@]}"; do
        wait_line "$dir/writer-$writer.out" '^ack ' 30 "${WRITER_PIDS[i]}" ||
            { cat "$dir/writer-$writer.out" "$dir/writer-$writer.err" | tail -n 5 >&2
              die "writer $writer got no ack before the fault ($dir)"; }
        i=$((i + 1))
    done
    sleep "$WARMUP"
}

# Injects fault $2 (kill9 or sigstop) into the primary (node 0) and tells the writers when.
inject() {
    local dir=$1 fault=$2 command pid
    command=kill9
    [[ $fault == sigstop ]] && command=freeze
    echo "$command 0" >&7
    wait_line "$dir/cluster.out" "^done $command 0( |\$)" 30 "$CLUSTER_PID" ||
        die "the cluster did not inject $fault ($dir)"
    for pid in "${WRITER_PIDS[@]}"; do
        kill -USR1 "$pid"
    done
}

# Waits for the writers to stop by themselves (they do within MAX_WAIT + SETTLE s of the fault).
wait_writers() {
    local pid
    for pid in "${WRITER_PIDS[@]}"; do
        wait_gone "$pid" $((MAX_WAIT + SETTLE + 30)) ||
            { say "warning: a writer did not stop by itself"; kill -TERM "$pid"; wait_gone "$pid" 5; }
    done
    WRITER_PIDS=()
}

# Port of the surviving node that is not in recovery, if exactly one is.
new_primary_port() {
    local name found=()
    for name in "${NODE_NAMES[@]:1}"; do
        [[ $(node_sql "${PORT[$name]}" 'SELECT pg_is_in_recovery()' 2>/dev/null) == f ]] &&
            found+=("${PORT[$name]}")
    done
    ((${#found[@]} == 1)) && echo "${found[0]}"
    return 0
}

# Prints "window lost" for writer output $1 and table $2 on the new primary on port $3 (empty: none).
measure() {
    local out=$1 table=$2 port=$3 window lost
    window=$(awk '
        $1 == "fault" { fault = $2 }
        $1 == "ack" { n++; t[n] = $3 }
        END {
            if (fault == "") { print "nofault"; exit }
            for (i = 1; i <= n; i++) {
                if (t[i] < fault && (before == "" || t[i] > before)) before = t[i]
                if (t[i] > fault && (after == "" || t[i] < after)) after = t[i]
            }
            if (before == "") print "noack"
            else if (after == "") print "none"
            else printf "%.3f\n", after - before
        }' "$out")
    lost=-
    if [[ -n $port ]]; then
        if node_sql "$port" "SELECT id FROM $table" >"$out.present"; then
            awk '$1 == "ack" { print $2 }' "$out" | sort >"$out.acked"
            lost=$(sort "$out.present" | comm -23 "$out.acked" - | wc -l)
        fi
    fi
    echo "$window $lost"
}

# Prints the coordinator's failover time of the run in directory $1: pgvigil's "failover complete"
# log line minus the moment the cluster reported the fault landed, in s; "-" when either is
# missing (pgpool-II's log has whole seconds only: it gets "-" too).
failover_time() {
    local dir=$1 stamp complete fault
    [[ $PROXY_KIND == pgvigil ]] || { echo -; return 0; }
    # The log's first field is an RFC 3339 UTC time; colour codes, if any, are dropped first.
    stamp=$(sed 's/\x1b\[[0-9;]*m//g' "$dir/proxy.log" | awk '/failover complete/ { print $1; exit }')
    fault=$(awk '$1 == "done" && NF == 4 { print $4; exit }' "$dir/cluster.out")
    if [[ -z $stamp || -z $fault ]] || ! complete=$(date -d "$stamp" +%s.%N 2>/dev/null); then
        echo -
        return 0
    fi
    awk -v c="$complete" -v f="$fault" 'BEGIN { printf "%.3f\n", c - f }'
}

# One run: proxy $1, fault $2, replication $3, run number $4; appends one line per writer to
# RESULTS: proxy fault replication writer run window lost failover.
run_once() {
    local proxy=$1 fault=$2 repl=$3 run=$4 dir writer port result failover
    dir=$WORK/$proxy-$fault-$repl-$run
    mkdir -p "$dir"
    chmod 0711 "$dir"
    PORT=()
    NODE_PIDS=()
    say "$proxy $fault $repl run $run: cluster"
    start_cluster "$dir" "$repl"
    create_tables
    "start_$proxy" "$dir"
    start_writers "$dir"
    warm_up "$dir"
    say "$proxy $fault $repl run $run: $fault of the primary"
    inject "$dir" "$fault"
    wait_writers
    port=$(new_primary_port)
    failover=$(failover_time "$dir")
    say "$proxy $fault $repl run $run: failover complete $failover s after the fault"
    for writer in "${WRITERS[@]}"; do
        result=$(measure "$dir/writer-$writer.out" "writes_${writer//-/_}" "$port")
        echo "$proxy $fault $repl $writer $run $result $failover" >>"$RESULTS"
        say "$proxy $fault $repl run $run: $writer writer: window ${result% *} s, lost acked ${result#* }"
    done
    stop_run_processes
    [[ -n $KEEP ]] || rm -rf "$dir"
}

report() {
    echo
    echo "Failover benchmark: $RUNS run(s) each; writers insert every 20 ms (keep: one connection,"
    echo "reconnect when broken; per-insert: a connection per insert), attempt timeout" \
        "${WRITER_TIMEOUT_MS} ms."
    echo "window: first ack after the fault - last ack before it, in s; none = no write within" \
        "${MAX_WAIT} s (infinite in the median)."
    echo "lost: acknowledged ids missing on the new primary (- = no node was promoted)."
    printf '%-8s %-8s %-6s %-10s %5s %10s %10s %10s %8s %9s   %s\n' proxy fault repl writer \
        resumed "median" min max "lost med" "lost max" "windows"
    sort -k1,1 -k2,2 -k3,3 -k4,4 -k5,5n "$RESULTS" | awk -v max_wait="$MAX_WAIT" '
        function flush(   i, j, tmp, med, m, hi, lm, lmax, nl) {
            if (key == "") return
            # Sort the windows, "none" (never resumed) as infinite.
            for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++)
                if (w[j] < w[i]) { tmp = w[i]; w[i] = w[j]; w[j] = tmp }
            m = (n % 2) ? w[(n + 1) / 2] : (w[n / 2] + w[n / 2 + 1]) / 2
            # Infinite as soon as the upper middle window is (never a mean with "none").
            hi = (n % 2) ? w[(n + 1) / 2] : w[n / 2 + 1]
            med = (hi >= 1e9) ? ">" max_wait : sprintf("%.3f", m)
            nl = 0; lmax = "-"
            for (i = 1; i <= n; i++) if (l[i] != "-") { nl++; ls[nl] = l[i] + 0 }
            for (i = 1; i <= nl; i++) for (j = i + 1; j <= nl; j++)
                if (ls[j] < ls[i]) { tmp = ls[i]; ls[i] = ls[j]; ls[j] = tmp }
            if (nl > 0) {
                lm = (nl % 2) ? ls[(nl + 1) / 2] : (ls[nl / 2] + ls[nl / 2 + 1]) / 2
                lmax = ls[nl]
            } else lm = "-"
            printf "%-8s %-8s %-6s %-10s %5s %10s %10s %10s %8s %9s   %s\n", k1, k2, k3, k4,
                resumed "/" n, med, (w[1] >= 1e9 ? "none" : sprintf("%.3f", w[1])),
                (w[n] >= 1e9 ? "none" : sprintf("%.3f", w[n])), lm, lmax, raw
        }
        {
            k = $1 " " $2 " " $3 " " $4
            if (k != key) { flush(); key = k; n = 0; resumed = 0; raw = ""
                            k1 = $1; k2 = $2; k3 = $3; k4 = $4 }
            n++
            if ($6 ~ /^[0-9.]+$/) { w[n] = $6 + 0; resumed++ } else w[n] = 1e9
            l[n] = $7
            raw = raw (raw == "" ? "" : " ") $6
        }
        END { flush() }'
    report_runs
}

# The per-run table: the coordinator's failover time beside each writer's window, and by how much
# the window exceeds it.
report_runs() {
    echo
    echo "Per run: failover = pgvigil's \"failover complete\" line - the fault, in s; then each" \
        "writer's window and, in brackets, window - failover."
    printf '%-8s %-8s %-6s %4s %9s' proxy fault repl run failover
    printf '   %-22s' "${WRITERS[@]}"
    printf '\n'
    # Rows come sorted by run, then writer: one output line per (proxy, fault, repl, run).
    sort -k1,1 -k2,2 -k3,3 -k5,5n -k4,4 "$RESULTS" | awk -v writers="${WRITERS[*]}" '
        BEGIN { nw = split(writers, order, " ") }
        function flush(   i, cell) {
            if (key == "") return
            printf "%-8s %-8s %-6s %4s %9s", k1, k2, k3, k5, fo
            for (i = 1; i <= nw; i++) {
                cell = (order[i] in win) ? win[order[i]] : "-"
                if (cell ~ /^[0-9.]+$/ && fo ~ /^[0-9.]+$/) cell = sprintf("%s (%+.3f)", cell, cell - fo)
                printf "   %-22s", cell
            }
            printf "\n"
        }
        {
            k = $1 " " $2 " " $3 " " $5
            if (k != key) { flush(); key = k; delete win; k1 = $1; k2 = $2; k3 = $3; k5 = $5; fo = $8 }
            win[$4] = $6
        }
        END { flush() }'
}

main() {
    local repl fault run proxy
    [[ $RUNS =~ ^[1-9][0-9]*$ ]] || die "RUNS must be a positive integer"
    [[ $MAX_WAIT =~ ^[1-9][0-9]*$ ]] || die "MAX_WAIT must be a positive integer (seconds)"
    [[ $SETTLE =~ ^[0-9]+$ && $WARMUP =~ ^[0-9]+$ ]] || die "SETTLE and WARMUP: whole seconds"
    [[ $PGPOOL_SR_CHECK_PERIOD =~ ^[0-9]+$ ]] || die "PGPOOL_SR_CHECK_PERIOD: whole seconds"
    for fault in $FAULTS; do
        [[ $fault == kill9 || $fault == sigstop ]] || die "FAULTS: kill9 and/or sigstop"
    done
    for repl in $REPLICATION; do
        [[ $repl == async || $repl == sync ]] || die "REPLICATION: async and/or sync"
    done
    check_tools
    build
    WORK=$(mktemp -d /tmp/failbench.XXXXXX)
    chmod 0711 "$WORK"
    RESULTS=$WORK/results
    : >"$RESULTS"
    say "proxies: $PROXIES; faults: $FAULTS; replication: $REPLICATION; $RUNS run(s) each"
    for repl in $REPLICATION; do
        for fault in $FAULTS; do
            for ((run = 1; run <= RUNS; run++)); do
                # Interleaved, so that both proxies see the machine in the same state.
                for proxy in $PROXIES; do
                    run_once "$proxy" "$fault" "$repl" "$run"
                done
            done
        done
    done
    report
}

# Sourced (by benches/switchover.sh) for its functions only.
[[ ${BASH_SOURCE[0]} != "$0" ]] || main "$@"
