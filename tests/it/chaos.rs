//! The fault soak's short version (issue 10, point 8): one round of each fault kind, in turn,
//! through the soak of benches/chaos/ (the same code `benches/chaos.sh` runs for 30 rounds):
//! kill -9 of the primary, SIGSTOP of the primary, kill -9 of a standby, pgvigil's path to the
//! primary cut, pgvigil restarted. After every round no acknowledged write is missing on the
//! primary, no checker transaction is torn, writes never went to two nodes, and every error a
//! client got carried a SQLSTATE. Prints the table (`--nocapture` shows it).

#[path = "../../benches/chaos/soak/mod.rs"]
mod soak;

// The soak reaches its relay as `super::relay`.
use crate::support::fresh_base_dir;
use crate::support::relay;
use soak::{FaultKind, Plan};

/// A fixed seed: the cut length and the standby killed are the same every run.
const SEED: u64 = 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_of_every_fault_kind_loses_nothing_and_never_writes_to_two_nodes() {
    let kinds = FaultKind::ALL.to_vec();
    let plan = Plan {
        schedule: kinds.clone(),
        seed: SEED,
        dir: fresh_base_dir(),
        node_logs: None,
        hold_ms: soak::HOLD_MS,
    };
    let reports = soak::run(plan)
        .await
        .unwrap_or_else(|e| panic!("the soak could not run: {e}"));
    print!("{}", soak::check::table(&reports));
    assert_eq!(reports.len(), kinds.len(), "the soak stopped early");
    let violations: Vec<String> = reports
        .iter()
        .flat_map(|r| {
            r.violations
                .iter()
                .map(move |v| format!("round {} ({}): {v}", r.round, r.fault))
        })
        .collect();
    assert!(violations.is_empty(), "{violations:#?}");
}
