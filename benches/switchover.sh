#!/usr/bin/env bash
# Switchover benchmark: a planned switchover there and back (pg1 -> pg2 -> pg1) under two
# writers, through pgvigil and through pgpool-II, RUNS times each.
#
# pgvigil: runs the integration test
# switchover::switchover_there_and_back_under_writers_loses_no_acknowledged_write
# (tests/it/switchover.rs). Each run builds a fresh 3-node cluster (fsync off), puts pgvigil with
# the local node control in front of it, starts two writers (one insert every 20 ms each: one on
# a kept connection, one connecting for every insert) and an idle session, switches over with
# `pgvigil switchover --to`, and checks that no acknowledged write is lost.
#
# pgpool-II: reuses benches/failover.sh's machinery (sourced): a fresh 3-node cluster (fsync on)
# from the failover_cluster example, pgpool-II 4.3 in streaming-replication mode (no load
# balancing) with a pcp user, and the failover_writer example's two writers (`keep` and
# `per-insert`, one insert every 20 ms each). It switches over with `pcp_promote_node
# --switchover -n N`: pgpool-II detaches the primary and runs
#   failover_command        (written by this script) stops the old primary (fast shutdown, so
#                           its standbys have all its WAL) and promotes node N (pg_promote)
#   follow_primary_command  (written by this script) for every other node: the old primary is
#                           rewound with pg_rewind --source-server, gets standby.signal and a
#                           primary_conninfo/slot to node N and is started; the other standby is
#                           repointed (ALTER SYSTEM, reload); then pcp_attach_node.
# A switchover is complete when pcp_node_info shows node N primary and both others standbys,
# all up, and node N is out of recovery (bounded by SWITCH_TIMEOUT s). The writers stop after
# the second switchover (+ WARMUP s); acknowledged ids missing on pg1 are counted as lost.
#
# Printed, as medians over all switchovers (two per run):
#   pause     the write pause pgvigil measured (writes held until the new primary is published);
#             "-" for pgpool-II, which does not report one
#   gap-keep  the longest time between two consecutive acknowledged writes of the kept-connection
#             writer (pgvigil: over the whole run, i.e. both switchovers, reported once per run;
#             pgpool-II: per switchover, the acks split halfway between the two switchovers)
#   gap-each  the same for the connection-per-insert writer
#   lost      acknowledged writes missing on the final primary, summed over both writers and all
#             runs (pgvigil: 0, the test fails if any is missing)
#
# Usage: benches/switchover.sh        (as root: the servers and pgpool-II run as `postgres`;
#                                      pgvigil alone also runs as a user that can run PostgreSQL)
#   RUNS=5                 runs per proxy
#   PROXIES="pgvigil pgpool"  which proxies; pgpool is skipped with the reason printed when it
#                          cannot run (not root, pgpool-II, pcp_promote_node or pg_rewind missing)
#   WARMUP=3               seconds of writing before, between and after the switchovers (pgpool)
#   SWITCH_TIMEOUT=60      seconds a pgpool-II switchover may take before the run fails
#   KEEP=1                 keep pgpool-II's work directory (logs, scripts.log) instead of deleting it
#   WRITER_BIN, CLUSTER_BIN  use these examples' binaries instead of building them (debug)
#   PG_BIN                 PostgreSQL bin dir (default: newest /usr/lib/postgresql/*/bin)
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-5}
PROXIES=${PROXIES:-"pgvigil pgpool"}
SWITCH_TIMEOUT=${SWITCH_TIMEOUT:-60}
[[ $RUNS =~ ^[1-9][0-9]*$ ]] || { echo "RUNS must be a positive integer" >&2; exit 1; }
[[ $SWITCH_TIMEOUT =~ ^[1-9][0-9]*$ ]] || { echo "SWITCH_TIMEOUT: whole seconds" >&2; exit 1; }

median() {
    sort -n | awk '{ v[NR] = $1 } END { if (NR == 0) { print "-"; exit }
        if (NR % 2) print v[(NR + 1) / 2]; else printf "%.0f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

# Prints "-" or "N ms" for the median of the numbers on stdin.
median_ms() {
    local m
    m=$(median)
    if [[ $m == - ]]; then echo -; else echo "$m ms"; fi
}

TABLE=()

# The pgvigil leg: RUNS runs of the switchover test; adds a row to TABLE.
pgvigil_leg() {
    local run out line pauses=() keeps=() eaches=() test
    test=switchover::switchover_there_and_back_under_writers_loses_no_acknowledged_write
    cargo test --test it --no-run >/dev/null 2>&1 || cargo test --test it --no-run
    for run in $(seq 1 "$RUNS"); do
        out=$(cargo test --test it "$test" -- --exact --nocapture 2>&1) || {
            echo "pgvigil run $run failed:" >&2
            echo "$out" | tail -40 >&2
            exit 1
        }
        # "write pause measured by pgvigil: 352 ms there, 330 ms back", or with
        # " (Session pooling)" before the colon.
        line=$(echo "$out" | grep -E 'write pause measured by pgvigil( \(Session pooling\))?:')
        pauses+=("$(echo "$line" | sed -E 's/.*: ([0-9]+) ms there.*/\1/')")
        pauses+=("$(echo "$line" | sed -E 's/.*, ([0-9]+) ms back.*/\1/')")
        # "switchover there and back[ (Session pooling)], kept connection: ..., longest write gap
        # 359.328431ms, ..." (Debug of a Duration: ms or s)
        gap_ms() {
            echo "$out" | grep -E "$1" | sed -E 's/.*longest write gap ([0-9.]+)(m?s).*/\1 \2/' |
                awk '{ if ($2 == "s") printf "%.0f\n", $1 * 1000; else printf "%.0f\n", $1 }'
        }
        keeps+=("$(gap_ms 'kept connection:')")
        eaches+=("$(gap_ms 'connection per insert:')")
        echo "pgvigil run $run: pause ${pauses[-2]} ms, ${pauses[-1]} ms; gap-keep ${keeps[-1]} ms;" \
            "gap-each ${eaches[-1]} ms"
    done
    TABLE+=("$(printf '%-10s %-10s %-10s %-10s %s' pgvigil \
        "$(printf '%s\n' "${pauses[@]}" | median_ms)" \
        "$(printf '%s\n' "${keeps[@]}" | median_ms)" \
        "$(printf '%s\n' "${eaches[@]}" | median_ms)" 0)")
}
# ---------------------------------------------------------------------------------------------
# pgpool-II leg: benches/failover.sh's machinery (sourced for its functions) with pcp, a
# failover_command and a follow_primary_command set up for a switchover.

PCP_USER=pcpadmin
PCP_PASSWORD=pcp-secret

# Settings and scripts added to benches/failover.sh's pgpool.conf (see start_pgpool there).
pgpool_extra_setup() {
    local dir=$1 p=$1/pgpool
    write_switchover_scripts "$dir"
    printf '%s:%s\n' "$PCP_USER" "$(printf '%s' "$PCP_PASSWORD" | md5sum | cut -d' ' -f1)" >"$p/pcp.conf"
    printf '127.0.0.1:%s:%s:%s\n' "${PORT[pcp]}" "$PCP_USER" "$PCP_PASSWORD" >"$p/pcppass"
    chown "$SERVER_USER": "$p/pcppass"
    chmod 0600 "$p/pcppass"
    cat <<EOF
failover_command = '$p/failover.sh %d %m %P'
follow_primary_command = '$p/follow_primary.sh %d %m %P'
EOF
}

# Writes the failover_command and follow_primary_command of a switchover into $1/pgpool; pgpool-II
# runs them as the server user.
write_switchover_scripts() {
    local dir=$1 p=$1/pgpool name
    {
        cat <<EOF
#!/usr/bin/env bash
set -u
export PATH=$PG_BIN:/usr/sbin:\$PATH PCPPASSFILE=$p/pcppass
log() { echo "\$(date +%H:%M:%S.%3N) \$(basename "\$0") \$*" >>"$p/scripts.log"; }
sql() {
    psql "host=127.0.0.1 port=\$1 user=postgres dbname=postgres connect_timeout=2" -XAtq \\
        -v ON_ERROR_STOP=1 -c "\$2" 2>>"$p/scripts.log"
}
pcp_port=${PORT[pcp]} pcp_user=$PCP_USER
p=$p
EOF
        printf 'names=(%s)\nports=(' "${NODE_NAMES[*]}"
        for name in "${NODE_NAMES[@]}"; do printf ' %s' "${PORT[$name]}"; done
        printf ' )\ndirs=('
        for name in "${NODE_NAMES[@]}"; do printf ' %s' "$dir/c/$name"; done
        printf ' )\n'
    } >"$p/common.sh"
    cat >"$p/failover.sh" <<'EOF'
#!/usr/bin/env bash
# pgpool-II's failover_command: failover.sh %d %m %P (detached node, new main node, old primary).
# In a switchover the old primary is still running: it is shut down first (a fast shutdown sends
# all its WAL to the connected standbys), so that the new primary has every committed write.
source "$(dirname "$0")/common.sh"
failed=$1 new=$2 old_primary=$3
log "called: detached=$failed new=$new old_primary=$old_primary"
[[ $failed == "$old_primary" ]] || { log "a standby was detached: nothing to do"; exit 0; }
((new >= 0)) || { log "no node to promote"; exit 1; }
if pg_ctl status -D "${dirs[failed]}" >/dev/null 2>&1; then
    pg_ctl stop -D "${dirs[failed]}" -m fast -w -t 30 >>"$p/scripts.log" 2>&1 ||
        log "stopping ${names[failed]} failed"
    log "stopped ${names[failed]}"
fi
sql "${ports[new]}" "SELECT pg_promote(wait => true, wait_seconds => 30)" >/dev/null ||
    { log "promoting ${names[new]} failed"; exit 1; }
log "promoted ${names[new]}"
EOF
    cat >"$p/follow_primary.sh" <<'EOF'
#!/usr/bin/env bash
# pgpool-II's follow_primary_command: follow_primary.sh %d %m %P (node to turn into a standby of
# the new primary, new primary, old primary). The old primary is stopped, rewound with pg_rewind
# from the new primary and started as its standby; another standby is only repointed. Either is
# then attached again with pcp_attach_node.
source "$(dirname "$0")/common.sh"
node=$1 new=$2 old_primary=$3
log "called: node=$node new=$new old_primary=$old_primary"
data=${dirs[node]} name=${names[node]}
sql "${ports[new]}" "SELECT pg_create_physical_replication_slot('$name') WHERE NOT EXISTS \
(SELECT 1 FROM pg_replication_slots WHERE slot_name = '$name')" >/dev/null ||
    { log "no slot for $name on ${names[new]}"; exit 1; }
conninfo="host=127.0.0.1 port=${ports[new]} user=postgres application_name=$name"
if [[ $(sql "${ports[node]}" 'SELECT pg_is_in_recovery()') == t ]]; then
    sql "${ports[node]}" "ALTER SYSTEM SET primary_conninfo = '$conninfo'" >/dev/null &&
        sql "${ports[node]}" "ALTER SYSTEM SET primary_slot_name = '$name'" >/dev/null &&
        sql "${ports[node]}" 'SELECT pg_reload_conf()' >/dev/null ||
        { log "repointing $name failed"; exit 1; }
    log "repointed $name"
else
    if pg_ctl status -D "$data" >/dev/null 2>&1; then
        pg_ctl stop -D "$data" -m fast -w -t 30 >>"$p/scripts.log" 2>&1 ||
            { log "stopping $name failed"; exit 1; }
    fi
    # pg_rewind reads the source's timeline from its control file, which a promoted standby
    # updates only at its first checkpoint.
    sql "${ports[new]}" CHECKPOINT >/dev/null || { log "CHECKPOINT on ${names[new]} failed"; exit 1; }
    # pg_rewind copies the source's configuration files: the node's own port and name are kept.
    cp "$data/node.conf" "$p/$name-node.conf"
    pg_rewind --target-pgdata="$data" \
        --source-server="host=127.0.0.1 port=${ports[new]} user=postgres dbname=postgres" \
        >>"$p/scripts.log" 2>&1 || { log "pg_rewind of $name failed"; exit 1; }
    cp "$p/$name-node.conf" "$data/node.conf" || { log "restoring $name's node.conf failed"; exit 1; }
    printf "primary_conninfo = '%s'\nprimary_slot_name = '%s'\n" "$conninfo" "$name" \
        >>"$data/postgresql.auto.conf"
    touch "$data/standby.signal"
    pg_ctl start -D "$data" -l "$p/$name-restarted.log" -w -t 60 >>"$p/scripts.log" 2>&1 ||
        { log "starting $name failed"; exit 1; }
    log "rewound and restarted $name as a standby of ${names[new]}"
fi
pcp_attach_node -h 127.0.0.1 -p "$pcp_port" -U "$pcp_user" -w -n "$node" >>"$p/scripts.log" 2>&1 ||
    { log "attaching $name failed"; exit 1; }
log "attached $name"
EOF
    chmod 0755 "$p/failover.sh" "$p/follow_primary.sh"
}

# Prints the role pgpool-II gives node $1 if it counts it as up (up or waiting), else "down".
pgpool_node_role() {
    local info
    info=$(PCPPASSFILE=$WORK_RUN/pgpool/pcppass pcp_node_info -h 127.0.0.1 -p "${PORT[pcp]}" \
        -U "$PCP_USER" -w -n "$1" 2>/dev/null) || { echo down; return 0; }
    # host port status weight status_name backend_status role backend_role ...
    set -- $info
    if [[ ${5:-} == up || ${5:-} == waiting ]]; then echo "${7:-down}"; else echo down; fi
}

# Switches over to node $1 with pcp_promote_node --switchover and waits up to SWITCH_TIMEOUT s
# until pgpool-II counts every node up, node $1 as its primary, and node $1 is out of recovery.
pgpool_switchover() {
    local to=$1 deadline=$((SECONDS + SWITCH_TIMEOUT)) i ok
    PCPPASSFILE=$WORK_RUN/pgpool/pcppass pcp_promote_node -h 127.0.0.1 -p "${PORT[pcp]}" \
        -U "$PCP_USER" -w -s -n "$to" >>"$WORK_RUN/pcp.log" 2>&1 ||
        { say "pcp_promote_node --switchover -n $to failed: $(tail -n 1 "$WORK_RUN/pcp.log")"; return 1; }
    while ((SECONDS < deadline)); do
        ok=1
        for i in "${!NODE_NAMES[@]}"; do
            if ((i == to)); then
                [[ $(pgpool_node_role "$i") == primary ]] || ok=""
            else
                [[ $(pgpool_node_role "$i") == standby ]] || ok=""
            fi
        done
        [[ -n $ok && $(node_sql "${PORT[${NODE_NAMES[to]}]}" 'SELECT pg_is_in_recovery()' 2>/dev/null) == f ]] &&
            return 0
        sleep 0.1
    done
    say "switchover to node $to not complete after $SWITCH_TIMEOUT s (see $WORK_RUN/pgpool/scripts.log)"
    return 1
}

# Prints the longest gap between two consecutive acks of writer output $1 (times since the writer
# started), in ms, before and after writer time $2: "first second".
longest_gaps() {
    awk -v split_at="$2" '
        $1 == "ack" {
            if (prev != "") {
                gap = $3 - prev
                if ($3 < split_at) { if (gap > g1) g1 = gap } else { if (gap > g2) g2 = gap }
            }
            prev = $3
        }
        END { printf "%.0f %.0f\n", g1 * 1000, g2 * 1000 }' "$1"
}

# One pgpool-II run (number $1): cluster, pgpool-II, writers, switchover pg1 -> pg2 -> pg1;
# appends "gap-keep gap-each" (ms) per switchover to PGPOOL_RESULTS and the acknowledged writes
# missing on pg1 at the end to PGPOOL_LOST.
pgpool_run_once() {
    local run=$1 to dir writer_start marks=() split port writer gaps lost=() there back
    dir=$WORK/pgpool-$run
    WORK_RUN=$dir
    mkdir -p "$dir"
    chmod 0711 "$dir"
    PORT=()
    NODE_PIDS=()
    say "pgpool run $run: cluster"
    start_cluster "$dir" async
    create_tables
    start_pgpool "$dir"
    writer_start=$(date +%s.%N)
    start_writers "$dir"
    warm_up "$dir"
    for to in 1 0; do
        marks+=("$(date +%s.%N)")
        say "pgpool run $run: pcp_promote_node --switchover to ${NODE_NAMES[to]}"
        pgpool_switchover "$to" || { collect_node_pids "$dir"; return 1; }
        marks+=("$(date +%s.%N)")
        say "pgpool run $run: switchover to ${NODE_NAMES[to]} complete in" \
            "$(awk -v a="${marks[-2]}" -v b="${marks[-1]}" 'BEGIN { printf "%.3f", b - a }') s"
        sleep "$WARMUP"
    done
    for pid in "${WRITER_PIDS[@]}"; do kill -TERM "$pid"; done
    wait_writers
    collect_node_pids "$dir"
    # Gaps before the middle of the quiet time between the two switchovers belong to the first.
    split=$(awk -v w="$writer_start" -v a="${marks[1]}" -v b="${marks[2]}" \
        'BEGIN { printf "%.6f", (a + b) / 2 - w }')
    port=${PORT[${NODE_NAMES[0]}]}
    there="" back=""
    for writer in "${WRITERS[@]}"; do
        gaps=$(longest_gaps "$dir/writer-$writer.out" "$split")
        there+=" ${gaps% *}" back+=" ${gaps#* }"
        lost+=("$(measure "$dir/writer-$writer.out" "writes_${writer//-/_}" "$port" | cut -d' ' -f2)")
    done
    echo "$there" >>"$PGPOOL_RESULTS"
    echo "$back" >>"$PGPOOL_RESULTS"
    [[ ${lost[0]} =~ ^[0-9]+$ && ${lost[1]} =~ ^[0-9]+$ ]] ||
        die "pgpool run $run: cannot read the ids on ${NODE_NAMES[0]} (port $port)"
    PGPOOL_LOST=$((PGPOOL_LOST + lost[0] + lost[1]))
    say "pgpool run $run: gap-keep${there% *} ms there,${back% *} ms back; gap-each" \
        "${there##* } ms there, ${back##* } ms back; lost acked writes: keep ${lost[0]}," \
        "per-insert ${lost[1]}"
    stop_run_processes
    [[ -n $KEEP ]] || rm -rf "$dir"
}

# Adds the postmasters the scripts restarted (outside the cluster process) to NODE_PIDS, so
# that the teardown stops them too.
collect_node_pids() {
    local name pid
    for name in "${NODE_NAMES[@]}"; do
        pid=$(head -n 1 "$1/c/$name/postmaster.pid" 2>/dev/null) || continue
        [[ $pid =~ ^[0-9]+$ ]] && NODE_PIDS+=("$pid")
    done
    return 0
}

# Why the pgpool-II leg cannot run here, if it cannot.
pgpool_unavailable() {
    local bin
    bin=${PG_BIN:-$(compgen -G '/usr/lib/postgresql/*/bin' | sort -V | tail -n 1 || true)}
    if [[ $(id -u) -ne 0 ]]; then echo "not root (the servers and pgpool-II run as postgres)"
    elif ! id postgres >/dev/null 2>&1; then echo "no 'postgres' OS user"
    elif [[ ! -x /usr/sbin/pgpool ]] && ! command -v pgpool >/dev/null; then
        echo "pgpool-II is not installed (apt-get install pgpool2)"
    elif ! command -v pcp_promote_node >/dev/null; then echo "pcp_promote_node not found"
    elif [[ -z $bin || ! -x $bin/pg_rewind ]]; then echo "pg_rewind not found (set PG_BIN)"
    fi
}

# The pgpool-II leg: RUNS runs of pgpool_run_once; adds a row to TABLE.
pgpool_leg() {
    local target run keeps=() eaches=() k1 e1
    target=${CARGO_TARGET_DIR:-$REPO/target}/debug/examples
    if [[ -z ${WRITER_BIN:-} || -z ${CLUSTER_BIN:-} ]]; then
        cargo build --example failover_cluster --example failover_writer
    fi
    WRITER_BIN=${WRITER_BIN:-$target/failover_writer}
    CLUSTER_BIN=${CLUSTER_BIN:-$target/failover_cluster}
    PG_BIN=${PG_BIN:-$(compgen -G '/usr/lib/postgresql/*/bin' | sort -V | tail -n 1)}
    PGPOOL=$(command -v pgpool || echo /usr/sbin/pgpool)
    export PATH=$PG_BIN:$PATH
    WORK=$(mktemp -d /tmp/swbench.XXXXXX)
    chmod 0711 "$WORK"
    PGPOOL_RESULTS=$WORK/results
    : >"$PGPOOL_RESULTS"
    PGPOOL_LOST=0
    for run in $(seq 1 "$RUNS"); do
        pgpool_run_once "$run" || {
            KEEP=1
            die "pgpool run $run: the switchover did not complete (logs kept in $WORK_RUN)"
        }
    done
    while read -r k1 e1; do
        keeps+=("$k1") eaches+=("$e1")
    done <"$PGPOOL_RESULTS"
    TABLE+=("$(printf '%-10s %-10s %-10s %-10s %s' pgpool - \
        "$(printf '%s\n' "${keeps[@]}" | median_ms)" \
        "$(printf '%s\n' "${eaches[@]}" | median_ms)" "$PGPOOL_LOST")")
}

# benches/failover.sh's variables and functions (cluster, writers, pgpool-II, teardown trap).
if [[ " $PROXIES " == *" pgpool "* ]]; then
    # shellcheck source=benches/failover.sh
    source benches/failover.sh
fi
for proxy in $PROXIES; do
    case $proxy in
    pgvigil) pgvigil_leg ;;
    pgpool)
        reason=$(pgpool_unavailable)
        if [[ -n $reason ]]; then
            echo "pgpool-II skipped: $reason" >&2
        else
            pgpool_leg
        fi
        ;;
    *) echo "unknown proxy '$proxy' in PROXIES (pgvigil, pgpool)" >&2; exit 1 ;;
    esac
done
echo
echo "Switchover there and back ($RUNS run(s) per proxy): medians over all switchovers"
printf '%-10s %-10s %-10s %-10s %s\n' proxy pause gap-keep gap-each lost
printf '%s\n' "${TABLE[@]}"
