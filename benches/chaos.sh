#!/usr/bin/env bash
# Fault soak (issue 10, point 8): rounds of random faults against a 3-node cluster with
# quorum-synchronous replication (synchronous_standby_names = 'ANY 1 (*)'), under a writer (one
# insert every 20 ms) and a checker (a two-row transaction every 100 ms), both through pgvigil.
# pgvigil runs inside the `chaos` example (benches/chaos/) and reaches every node through a TCP
# relay that can be cut. The faults, drawn with a seeded generator:
#   kill9         SIGKILL of the primary
#   freeze        SIGSTOP of the primary for 2-10 s, then SIGCONT
#   kill-standby  SIGKILL of a standby, started again 2 s later
#   cut           pgvigil's path to the primary cut for 2-10 s (the standbys keep streaming), healed
#   restart       pgvigil shut down and started again on its state file; the clients reach it
#                 through a relay that closes their connections then, as a dying process would
# After every round (writes flowing again): every acknowledged write is on the primary pgvigil
# routes to; every checker transaction is there whole or not at all; no write sent after another
# node took writes was acknowledged by an earlier node (split brain through pgvigil); every error
# a client got while pgvigil was running carried a SQLSTATE. Then failback: a node that does not
# stream from the primary again within 15 s (an old primary, fenced or killed) is re-cloned with
# pg_basebackup, and pgvigil restarts with an empty state file when it had fenced a node (there is
# no failback command yet), so that every round starts from three healthy nodes.
# Prints one line per round, then the table (round, fault, acked, lost, torn, split-brain
# windows through pgvigil, 2w_n/s: windows and seconds in which two nodes accepted writes when
# asked directly every 200 ms (a thawed old primary until pgvigil fences it; measured, not a
# violation), longest gap between two writer acks, errors with SQLSTATE, client time-outs (15 s
# without an answer), errors without SQLSTATE, primary after the round); exits 1 on any
# violation, 2 if the soak could not run. The rules are spelled out in
# benches/chaos/soak/check.rs.
#
# Usage: benches/chaos.sh          (as root: the servers run as `postgres`)
#   ROUNDS=30        rounds
#   SEED=            seed of the generator (default: drawn and printed; set it to replay a run)
#   FAULTS=kill9,freeze,kill-standby,cut,restart   the kinds to draw from
#   ORDER=random     or in-turn: the kinds of FAULTS one after the other
#   HOLD_MS=MIN-MAX  lengths of freezes and cuts in ms (default 2000-10000; narrow it to aim at a
#                    moment, e.g. 2800-3200 for a thaw while pgvigil promotes)
#   KEEP=1           keep the work directory (pgvigil's log, the nodes' logs in nodes/) instead of
#                    deleting it; a run with violations keeps it anyway
#   CHAOS_BIN        use this binary instead of building the example (release)
#
# Runtime: 10-25 s per round (the freeze and cut lengths, failback by re-cloning, pgvigil's
# restart): 30 rounds (seed 2026) took 6.5 min.
set -euo pipefail

ROUNDS=${ROUNDS:-30}
SEED=${SEED:-}
FAULTS=${FAULTS:-kill9,freeze,kill-standby,cut,restart}
ORDER=${ORDER:-random}
HOLD_MS=${HOLD_MS:-}
KEEP=${KEEP:-}
REPO=$(cd "$(dirname "$0")/.." && pwd)

say() { printf 'chaos.sh: %s\n' "$*" >&2; }
die() {
    say "$*"
    exit 2
}

if [[ -z ${CHAOS_BIN:-} ]]; then
    target=$REPO/target/release
    [[ -n ${CARGO_TARGET_DIR:-} ]] && target=$CARGO_TARGET_DIR/release
    say "building the chaos example (release)"
    (cd "$REPO" && cargo build --release --example chaos) || die "cargo build --release failed"
    CHAOS_BIN=$target/examples/chaos
fi
[[ -x $CHAOS_BIN ]] || die "$CHAOS_BIN is not executable"

# Short: the cluster's Unix sockets live in it (107 bytes at most).
work=$(mktemp -d /tmp/chaos.XXXXXX)
# The servers run as `postgres` and must reach the cluster directory inside.
chmod 0711 "$work"
cleanup() {
    if [[ -n $KEEP ]]; then
        say "kept $work"
    else
        rm -rf "$work"
    fi
}
trap cleanup EXIT

args=(--rounds "$ROUNDS" --faults "$FAULTS" --order "$ORDER" --dir "$work/cluster"
    --log "$work/pgvigil.log" --node-logs "$work/nodes")
[[ -n $SEED ]] && args+=(--seed "$SEED")
[[ -n $HOLD_MS ]] && args+=(--hold-ms "$HOLD_MS")
status=0
"$CHAOS_BIN" "${args[@]}" || status=$?
if ((status == 1)); then
    say "violations found; pgvigil's log: $work/pgvigil.log (rounds are marked 'chaos: fault begins'), the nodes' logs: $work/nodes/"
    KEEP=1
fi
exit "$status"
