#!/usr/bin/env bash
# The Compose stack, tested with the real Docker engine (issue 15). Builds every image without a
# registry (docker/offline/images.sh makes the base images), brings docker/compose.yaml up, then:
#   1. both sidecars send writes to the primary and reads to a standby (and the published port);
#   2. docker kill of the primary while both applications write: exactly one standby promoted,
#      writes resume through both sidecars, no acknowledged write lost;
#   3. the old primary, started again, fails back with one `pgvigil failback` (docker exec);
#   4. the leader's application cut from the primary's network: no failover follows;
# and tears everything down (containers, networks, volumes) however it ends. Prints each
# step's time (KEEP_STACK_ON_FAILURE=1 leaves a failed stack up to look at). Needs docker, docker compose (or docker-compose), debootstrap when
# debian:bookworm-slim is missing, psql, python3, and the crates of Cargo.lock in the host's
# cargo cache (any cargo build of the project fetches them).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
cd "$here"

export DOCKER_BUILDKIT=0
export COMPOSE_PROJECT_NAME="${COMPOSE_PROJECT_NAME:-pgvigiltest}"
# The standalone pgvigil on a free host port of the loopback.
export PGVIGIL_PUBLISH="127.0.0.1:"
export PGVIGIL_ADMIN_TOKEN="test-admin-$$"
export PGVIGIL_AGENT_TOKEN="test-agent-$$"
RUST_VERSION="$(rustc --version | awk '{ split($2, v, "."); print v[1] "." v[2] }')"
export RUST_VERSION
project="$COMPOSE_PROJECT_NAME"

if docker compose version >/dev/null 2>&1; then
    compose_cmd=(docker compose -f "$here/compose.yaml")
else
    compose_cmd=(docker-compose -f "$here/compose.yaml")
fi
compose() { "${compose_cmd[@]}" "$@"; }

t0=$(date +%s%N)
t_step=$t0
ms_since() { echo $(( ($(date +%s%N) - $1) / 1000000 )); }
step() {
    local now; now=$(date +%s%N)
    printf '    (%d.%03d s)\n' $(( (now - t_step) / 1000000000 )) $(( (now - t_step) / 1000000 % 1000 ))
    t_step=$now
    printf '\n--> [%3d s] %s\n' $(( (now - t0) / 1000000000 )) "$*"
}
fail() {
    echo "FAILED: $*" >&2
    exit 1
}

teardown() {
    local rc=$?
    if [ "$rc" -ne 0 ]; then
        echo "--- the stack's last logs ---"
        compose logs --no-color --tail=40 2>&1 | tail -300 || true
    fi
    if [ "$rc" -ne 0 ] && [ -n "${KEEP_STACK_ON_FAILURE:-}" ]; then
        echo "--> the stack is left up (KEEP_STACK_ON_FAILURE): $(printf '%q ' "${compose_cmd[@]}")down -v"
        rm -rf "$work"
        exit "$rc"
    fi
    echo "--> teardown (containers, networks, volumes)"
    compose down -v --remove-orphans -t 5 >/dev/null 2>&1 || true
    rm -rf "$work"
    if [ "$rc" -eq 0 ]; then
        echo "docker: 1 passed, 0 failed"
    else
        echo "docker: 0 passed, 1 failed"
    fi
    exit "$rc"
}

# The id of SERVICE's container, read once after `up` (a killed container is not listed by
# every compose, and compose itself is slow to start).
declare -A ids
services=(etcd1 etcd2 etcd3 pg1 pg2 pg3 pgvigil app1 pgvigil-app1 app2 pgvigil-app2)
read_ids() {
    local svc
    for svc in "${services[@]}"; do
        ids[$svc]="$(compose ps -q "$svc")"
        [ -n "${ids[$svc]}" ] || fail "no container for $svc"
    done
}
cid() { echo "${ids[$1]:?unknown service $1}"; }
# SQL on NODE itself, as postgres over its local socket.
on_node() { docker exec "$(cid "$1")" psql -XAtq -d "${3:-postgres}" -c "$2"; }
# SQL through APP's sidecar (the application's own environment: localhost:9999).
via_app() { docker exec "$(cid "$1")" psql -XAtq -c "$2"; }
# pgvigil's CLI in SERVICE's container.
pgvigil_in() { local svc=$1; shift; docker exec "$(cid "$svc")" pgvigil "$@"; }
# One field of SERVICE's `pgvigil status --json`: a Python expression on `s`.
status_of() {
    pgvigil_in "$1" status --json 2>/dev/null \
        | python3 -c "import json,sys; s=json.load(sys.stdin); v=$2; print('' if v is None else v)"
}
node_field() { status_of "$1" "next(n['$3'] for n in s['nodes'] if n['name'] == '$2')"; }
# Waits until the command succeeds, at most SECONDS.
wait_for() {
    local what=$1 seconds=$2; shift 2
    local deadline=$(( $(date +%s) + seconds ))
    until "$@" >/dev/null 2>&1; do
        [ "$(date +%s)" -lt "$deadline" ] || fail "not within ${seconds}s: $what"
        sleep 0.5
    done
}
# Acknowledged writes of APP ("N MS" lines), from its output.
acks() { docker logs "$(cid "$1")" 2>/dev/null | awk '$1 == "ack" { print $2, $3 }'; }
ack_count() { acks "$1" | wc -l; }
acked_after() { [ "$(acks "$1" | awk -v t="$2" '$2 > t' | wc -l)" -ge "${3:-1}" ]; }
# Every acknowledged write of APP is on NODE.
no_ack_lost() {
    local app=$1 node=$2 missing
    acks "$app" | awk '{ print $1 }' | sort -u >"$work/$app.acked"
    on_node "$node" "SELECT n FROM ticks WHERE app = '$app'" app | sort -u >"$work/$app.stored"
    missing="$(comm -23 "$work/$app.acked" "$work/$app.stored" | wc -l)"
    echo "    $app: $(wc -l <"$work/$app.acked") writes acknowledged, $missing missing on $node"
    [ "$missing" -eq 0 ] || fail "$app: acknowledged writes missing on $node: $(comm -23 "$work/$app.acked" "$work/$app.stored" | head -5 | tr '\n' ' ')"
}
# The node whose address on its own network is IP.
node_of_ip() {
    local node
    for node in pg1 pg2 pg3; do
        if [ "$(docker inspect -f "{{(index .NetworkSettings.Networks \"${project}_${node}-net\").IPAddress}}" "$(cid "$node")")" = "$1" ]; then
            echo "$node"
            return
        fi
    done
    echo "unknown($1)"
}
in_recovery() { [ "$(on_node "$1" "SELECT pg_is_in_recovery()")" = "$2" ]; }
# NODE streams from PRIMARY on PRIMARY's timeline, by NODE itself and by the leader.
streams_from() {
    local node=$1 primary=$2 lead
    lead="$(service_of_instance "$(leader)")"
    [ "$(on_node "$node" "SELECT status || ' ' || sender_host || ' ' || received_tli FROM pg_stat_wal_receiver")" = \
        "streaming $primary $(on_node "$primary" "SELECT timeline_id FROM pg_control_checkpoint()")" ] &&
        [ "$(node_field "$lead" "$node" role)" = standby ] &&
        [ "$(node_field "$lead" "$node" timeline)" = "$(node_field "$lead" "$primary" timeline)" ]
}
primary_is() { [ "$(status_of "$1" "s['primary']")" = "$2" ]; }
primary_moved_from() { local p; p="$(status_of "$1" "s['primary']")"; [ -n "$p" ] && [ "$p" != "$2" ]; }
health_is() { [ "$(node_field "$1" "$2" health)" = "$3" ]; }
role_is() { [ "$(node_field "$1" "$2" role)" = "$3" ]; }
container_healthy() { [ "$(docker inspect -f '{{.State.Health.Status}}' "$(cid "$1")")" = healthy ]; }
acks_at_least() { [ "$(ack_count "$1")" -ge "$2" ]; }
has_row() { [ -n "$(on_node "$1" "SELECT 1 FROM ticks WHERE app = '$2' AND n = $3" app)" ]; }
leader_known() { [ -n "$(leader)" ]; }
sidecar_leads() { local l; l="$(leader)"; [ -n "$l" ] && [ "$l" != pgvigil ]; }
leader() { docker exec "$(cid etcd1)" etcdctl get --print-value-only /pgvigil/compose/leader; }
# The compose service of the pgvigil instance named NAME.
service_of_instance() { case $1 in pgvigil) echo pgvigil ;; *) echo "pgvigil-$1" ;; esac; }

work="$(mktemp -d)"
trap teardown EXIT

step "base images without a registry (debian:bookworm-slim, rust:$RUST_VERSION-bookworm)"
RUST_VERSION="$RUST_VERSION" "$here/offline/images.sh"

step "build pgvigil, pgvigil-postgres, pgvigil-etcd (docker build, the classic builder)"
build() {
    local tag=$1; shift
    docker build --build-arg "RUST_VERSION=$RUST_VERSION" -t "$tag" "$@" >"$work/build.log" 2>&1 \
        || { tail -40 "$work/build.log"; fail "docker build of $tag"; }
}
build pgvigil:latest -f "$here/Dockerfile" "$root"
build pgvigil-postgres:latest -f "$here/postgres/Dockerfile" "$root"
build pgvigil-etcd:latest "$here/etcd"
docker image ls --format '    {{.Repository}}:{{.Tag}} {{.Size}}' | grep -E 'pgvigil|bookworm'

step "compose up (etcd x3, pg1 primary, pg2 and pg3 standbys, pgvigil, app1 and app2 with sidecars)"
compose down -v --remove-orphans -t 1 >/dev/null 2>&1 || true
timeout 300 "${compose_cmd[@]}" up -d --no-build >"$work/up.log" 2>&1 || { cat "$work/up.log"; fail "compose up"; }
read_ids
port="$(compose port pgvigil 9999 | sed 's/.*://')"
wait_for "pgvigil sees pg1 as primary" 60 primary_is pgvigil pg1
for node in pg2 pg3; do
    wait_for "$node streams from pg1" 60 streams_from "$node" pg1
done
for svc in pgvigil-app1 pgvigil-app2; do
    wait_for "$svc healthy" 60 container_healthy "$svc"
    wait_for "$svc sees pg1 as primary" 30 primary_is "$svc" pg1
done
wait_for "a leader in etcd" 30 leader_known
echo "    leader: $(leader); standalone pgvigil on 127.0.0.1:$port"
for app in app1 app2; do
    wait_for "$app writes" 60 acks_at_least "$app" 5
done

step "routing: writes to the primary, reads to a standby, through each sidecar and the published port"
check_routing() {
    local where=$1 primary=$2 read write
    read="$("${@:3}" "SELECT pg_is_in_recovery(), inet_server_addr()")"
    write="$("${@:3}" "WITH w AS (INSERT INTO ticks (app, n) VALUES ('route-$where', $(date +%s%N)) RETURNING 1) SELECT pg_is_in_recovery(), inet_server_addr() FROM w")"
    echo "    $where: read on $(node_of_ip "${read#*|}") (in recovery: ${read%%|*}), write on $(node_of_ip "${write#*|}") (in recovery: ${write%%|*})"
    [ "${read%%|*}" = t ] || fail "$where: a read went to the primary"
    [ "${write%%|*}" = f ] && [ "$(node_of_ip "${write#*|}")" = "$primary" ] || fail "$where: a write missed the primary $primary"
}
host_psql() { PGPASSWORD=app-secret psql -XAtq -h 127.0.0.1 -p "$port" -U app -d app -c "$1"; }
check_routing app1 pg1 via_app app1
check_routing app2 pg1 via_app app2
read="$(host_psql "SELECT pg_is_in_recovery()")"
write="$(host_psql "WITH w AS (INSERT INTO ticks (app, n) VALUES ('route-host', 1) RETURNING 1) SELECT pg_is_in_recovery() FROM w")"
echo "    host -> 127.0.0.1:$port: read in recovery: $read, write in recovery: $write"
[ "$read" = t ] && [ "$write" = f ] || fail "the standalone pgvigil misroutes"

step "failover: docker kill pg1 while app1 and app2 write"
kill_ms=$(date +%s%3N)
docker kill "$(cid pg1)" >/dev/null
wait_for "a new primary published" 60 primary_moved_from pgvigil pg1
published_ms=$(date +%s%3N)
new="$(status_of pgvigil "s['primary']")"
other="$( [ "$new" = pg2 ] && echo pg3 || echo pg2 )"
echo "    the standalone pgvigil routes writes to $new $(( published_ms - kill_ms )) ms after the kill (or less: polled)"
for app in app1 app2; do
    wait_for "$app writes again after the failover" 60 acked_after "$app" "$published_ms"
    # What the application saw: its longest wait between two acknowledged writes, from the
    # kill to its first write after the new primary was published.
    gap="$(acks "$app" | awk -v k="$kill_ms" -v p="$published_ms" '
        $2 > p { if (prev) { g = $2 - prev; if (g > max) max = g }; exit }
        { if (prev && $2 > k) { g = $2 - prev; if (g > max) max = g }; prev = $2 }
        END { print max + 0 }')"
    echo "    $app: writes resumed; longest wait between two acknowledged writes: $gap ms"
done
in_recovery "$new" f || fail "$new is published but in recovery"
in_recovery "$other" t || fail "both pg2 and pg3 were promoted"
echo "    promoted: $new only; $other still a standby"
wait_for "$other streams from $new" 60 streams_from "$other" "$new"
for app in app1 app2; do
    no_ack_lost "$app" "$new"
done
pgvigil_in "$(service_of_instance "$(leader)")" status --json | python3 -c '
import json, sys
events = json.load(sys.stdin)["events"]
at = {e["kind"]: e["at_ms"] for e in events if e["kind"] in ("detected", "decided", "promoted", "first_write")}
if "detected" in at:
    t0 = at["detected"]
    print("    leader events after detection: " + ", ".join(f"{k} +{v - t0} ms" for k, v in at.items()))'

step "failback: pg1 started again, then one pgvigil failback pg1"
docker start "$(cid pg1)" >/dev/null
wait_for "pgvigil reaches pg1 again" 60 health_is pgvigil pg1 up
fb_start=$(date +%s%N)
compose exec -T pgvigil pgvigil failback pg1 || fail "pgvigil failback pg1"
echo "    failback command: $(ms_since "$fb_start") ms (leader: $(leader))"
in_recovery pg1 t || fail "pg1 is not a standby after failback"
wait_for "pg1 streams from $new" 60 streams_from pg1 "$new"
last="$(acks app1 | tail -1 | awk '{ print $1 }')"
wait_for "pg1 replays app1's write $last" 30 has_row pg1 app1 "$last"
echo "    pg1 streams from $new on timeline $(node_field "$(service_of_instance "$(leader)")" pg1 timeline) and has replayed app1's write $last"
# Every instance, the followers too (they take the leader's fences from etcd), uses pg1 again.
for svc in pgvigil pgvigil-app1 pgvigil-app2; do
    wait_for "$svc sees pg1 as a standby" 30 role_is "$svc" pg1 standby
done

step "partition: the leader's application cut from the primary's network; no failover follows"
# The instance cut off is the leader, the one that would promote if the majority rule did not
# hold: when the standalone leads, it steps down while stopped and a sidecar takes over.
if [ "$(leader)" = pgvigil ]; then
    docker stop -t 5 "$(cid pgvigil)" >/dev/null
    wait_for "a sidecar leads" 40 sidecar_leads
    docker start "$(cid pgvigil)" >/dev/null
    wait_for "the standalone pgvigil is back" 60 primary_is pgvigil "$new"
fi
cut_app="$(leader)"
cut_svc="$(service_of_instance "$cut_app")"
echo "    leader: $cut_app; cutting $cut_app from ${new}-net"
docker network disconnect "${project}_${new}-net" "$(cid "$cut_app")"
wait_for "$cut_svc finds $new down" 30 health_is "$cut_svc" "$new" down
hold_ms=$(date +%s%3N)
# A failover would need health.failures (3) probes of 1 s and the leader's decision: 15 s is
# several times that.
for _ in $(seq 15); do
    sleep 1
    in_recovery "$new" f || fail "$new stopped being the primary"
    for node in pg1 pg2 pg3; do
        [ "$node" = "$new" ] || in_recovery "$node" t || fail "$node was promoted while $cut_app was cut off"
    done
    [ "$(status_of pgvigil "s['primary']")" = "$new" ] || fail "the standalone pgvigil lost the primary"
done
[ "$(node_field "$cut_svc" "$new" health)" = down ] || fail "$cut_svc was not cut off all along"
still="$( [ "$cut_app" = app1 ] && echo app2 || echo app1 )"
acked_after "$still" "$hold_ms" 10 || fail "$still's writes stopped while $cut_app was cut off"
echo "    15 s with $cut_app cut off from $new: no promotion; $still wrote on"
docker network connect "${project}_${new}-net" "$(cid "$cut_app")"
rejoin_ms=$(date +%s%3N)
wait_for "$cut_app writes again" 60 acked_after "$cut_app" "$rejoin_ms"
for app in app1 app2; do
    no_ack_lost "$app" "$new"
done

step "all checks passed in $(( $(ms_since "$t0") / 1000 )) s"
