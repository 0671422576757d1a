//! What is checked after every round, and the table the soak prints.
//!
//! The rules, each a violation when broken:
//! - **lost**: every write acknowledged before the check began is on the current primary
//!   (writer ids in `chaos_ticks`, checker transactions with both rows in `chaos_pairs`);
//! - **torn**: every transaction of the checker is on the current primary whole or not at all;
//! - **split brain**: writes go through pgvigil to one node at a time. Acks are ordered by
//!   arrival; once node B has acknowledged a write, a write *sent after that ack* and
//!   acknowledged by another node A is a violation (pgvigil routed new work to a node that was
//!   no longer the one taking writes). A request sent earlier may still complete on A (a commit a
//!   frozen primary had in hand and finishes when thawed) and is not counted. A split-brain
//!   window is a run of consecutive such acks;
//! - **no SQLSTATE**: every error a client got while pgvigil was running is an ErrorResponse
//!   with a SQLSTATE. Closed or refused connections while pgvigil itself restarts (and for
//!   [`RESTART_GRACE`] after) are expected; a client's own timeout is counted, not a violation.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use super::load::{Ack, Failure, LoadLog, Source};

/// How long after pgvigil is back a client may still stumble on a connection it lost.
pub const RESTART_GRACE: Duration = Duration::from_secs(2);

/// How many examples a violation quotes.
const EXAMPLES: usize = 5;

/// The outcome of one round.
#[derive(Debug, Clone, Default)]
pub struct RoundReport {
    /// 1-based round number.
    pub round: usize,
    /// The fault as injected ("kill9 pg1", "freeze pg2 4s", ...).
    pub fault: String,
    /// Writes acknowledged during the round (both clients).
    pub acknowledged: usize,
    /// Acknowledged writes (all so far) missing on the current primary.
    pub lost: usize,
    /// Checker transactions found with one row of two.
    pub torn: usize,
    /// Runs of acks that broke the one-node rule.
    pub split_brain_windows: usize,
    /// Times two nodes accepted writes at once, asked directly (not a violation by itself:
    /// see `watch`).
    pub two_writable_windows: usize,
    /// How long they did in all.
    pub two_writable: Duration,
    /// Longest time between two consecutive writer acks in the round.
    pub longest_gap: Duration,
    /// Errors with a SQLSTATE.
    pub sqlstate_errors: usize,
    /// How many of them had each SQLSTATE.
    pub sqlstates: BTreeMap<String, usize>,
    /// Attempts the client abandoned after its deadline.
    pub timeouts: usize,
    /// Errors without SQLSTATE outside pgvigil's restarts.
    pub no_sqlstate: usize,
    /// The node that takes writes after the round.
    pub primary: String,
    /// What went wrong, one line each; empty when the round passed.
    pub violations: Vec<String>,
}

/// The rows found on the current primary.
#[derive(Debug, Default)]
pub struct Found {
    /// Writer ids in `chaos_ticks`.
    pub ticks: BTreeSet<i64>,
    /// Rows per checker transaction in `chaos_pairs`.
    pub pairs: BTreeMap<i64, usize>,
}

impl Found {
    /// Reads `ids` and `txn:count` lists as psql prints them (comma-separated).
    pub fn parse(ticks: &str, pairs: &str) -> Result<Found, String> {
        let mut found = Found::default();
        for id in ticks.split(',').filter(|s| !s.is_empty()) {
            found
                .ticks
                .insert(id.parse().map_err(|_| format!("not an id: {id:?}"))?);
        }
        for entry in pairs.split(',').filter(|s| !s.is_empty()) {
            let parsed = entry
                .split_once(':')
                .and_then(|(txn, n)| Some((txn.parse().ok()?, n.parse().ok()?)));
            let (txn, rows) = parsed.ok_or_else(|| format!("not txn:rows: {entry:?}"))?;
            found.pairs.insert(txn, rows);
        }
        Ok(found)
    }
}

/// Checks `log` (all acks so far, taken before `found` was read) against `found`, and the
/// acks and errors of the round that began at `began`, given the times pgvigil was down.
pub fn check_round(
    report: &mut RoundReport,
    log: &LoadLog,
    found: &Found,
    began: Instant,
    restarts: &[(Instant, Instant)],
) {
    let round_acks: Vec<&Ack> = log.acks.iter().filter(|a| a.at >= began).collect();
    report.acknowledged = round_acks.len();
    check_durable(report, log, found);
    check_one_writer(report, &round_acks);
    report.longest_gap = longest_gap(&round_acks);
    check_errors(report, log, began, restarts);
}

fn check_durable(report: &mut RoundReport, log: &LoadLog, found: &Found) {
    let missing: Vec<String> = log
        .acks
        .iter()
        .filter(|a| match a.source {
            Source::Writer => !found.ticks.contains(&a.id),
            Source::Checker => found.pairs.get(&a.id) != Some(&2),
        })
        .map(|a| format!("{:?} {}", a.source, a.id))
        .collect();
    report.lost = missing.len();
    if !missing.is_empty() {
        report.violations.push(format!(
            "{} acknowledged writes are not on the primary {}: {:?}",
            missing.len(),
            report.primary,
            &missing[..missing.len().min(EXAMPLES)]
        ));
    }
    let torn: Vec<i64> = found
        .pairs
        .iter()
        .filter(|&(_, &rows)| rows != 2)
        .map(|(&txn, _)| txn)
        .collect();
    report.torn = torn.len();
    if !torn.is_empty() {
        report.violations.push(format!(
            "{} checker transactions are not whole on {}: {:?}",
            torn.len(),
            report.primary,
            &torn[..torn.len().min(EXAMPLES)]
        ));
    }
}

fn check_one_writer(report: &mut RoundReport, acks: &[&Ack]) {
    let mut ordered = acks.to_vec();
    ordered.sort_by_key(|a| a.at);
    let mut current: Option<u16> = None;
    // Nodes writes moved away from, and when the next node's first ack arrived.
    let mut left: BTreeMap<u16, Instant> = BTreeMap::new();
    let mut in_window = false;
    let mut examples = Vec::new();
    for ack in ordered {
        if let Some(&since) = left.get(&ack.port) {
            // Sent before the newer node took over, it may finish where it was sent.
            if ack.sent > since {
                if !in_window {
                    report.split_brain_windows += 1;
                    in_window = true;
                }
                if examples.len() < EXAMPLES {
                    examples.push(format!(
                        "{:?} {} acknowledged by :{}, sent {:?} after another node took writes",
                        ack.source,
                        ack.id,
                        ack.port,
                        ack.sent - since
                    ));
                }
            }
            continue;
        }
        in_window = false;
        if current != Some(ack.port) {
            if let Some(old) = current {
                left.insert(old, ack.at);
            }
            current = Some(ack.port);
        }
    }
    if report.split_brain_windows > 0 {
        report.violations.push(format!(
            "writes through pgvigil to two nodes ({} windows): {examples:?}",
            report.split_brain_windows
        ));
    }
}

fn longest_gap(acks: &[&Ack]) -> Duration {
    let mut times: Vec<Instant> = acks
        .iter()
        .filter(|a| a.source == Source::Writer)
        .map(|a| a.at)
        .collect();
    times.sort();
    times
        .windows(2)
        .map(|pair| pair[1] - pair[0])
        .max()
        .unwrap_or_default()
}

fn check_errors(
    report: &mut RoundReport,
    log: &LoadLog,
    began: Instant,
    restarts: &[(Instant, Instant)],
) {
    let mut examples = Vec::new();
    for error in log.errors.iter().filter(|e| e.at >= began) {
        match &error.failure {
            Failure::Sqlstate(code, _) => {
                report.sqlstate_errors += 1;
                *report.sqlstates.entry(code.clone()).or_default() += 1;
            }
            Failure::Timeout => report.timeouts += 1,
            Failure::NoSqlstate(text) => {
                let excused = restarts
                    .iter()
                    .any(|&(down, up)| error.at >= down && error.at <= up + RESTART_GRACE);
                if !excused {
                    report.no_sqlstate += 1;
                    if examples.len() < EXAMPLES {
                        examples.push(format!("{:?}: {text}", error.source));
                    }
                }
            }
        }
    }
    if report.no_sqlstate > 0 {
        report.violations.push(format!(
            "{} errors without SQLSTATE: {examples:?}",
            report.no_sqlstate
        ));
    }
}

/// The table's header line.
pub fn header() -> String {
    format!(
        "{:>5}  {:<20} {:>6} {:>5} {:>5} {:>6} {:>9} {:>8} {:>7} {:>5} {:>7}  {:<7} verdict",
        "round",
        "fault",
        "acked",
        "lost",
        "torn",
        "split",
        "2w_n/s",
        "gap_s",
        "sqlerr",
        "t/o",
        "no_sqls",
        "primary"
    )
}

/// One round's line of the table.
pub fn row(r: &RoundReport) -> String {
    let verdict = if r.violations.is_empty() {
        "ok"
    } else {
        "VIOLATION"
    };
    format!(
        "{:>5}  {:<20} {:>6} {:>5} {:>5} {:>6} {:>9} {:>8.2} {:>7} {:>5} {:>7}  {:<7} {verdict}",
        r.round,
        r.fault,
        r.acknowledged,
        r.lost,
        r.torn,
        r.split_brain_windows,
        format!(
            "{}/{:.1}",
            r.two_writable_windows,
            r.two_writable.as_secs_f64()
        ),
        r.longest_gap.as_secs_f64(),
        r.sqlstate_errors,
        r.timeouts,
        r.no_sqlstate,
        r.primary,
    )
}

/// The table: one line per round and a total.
pub fn table(reports: &[RoundReport]) -> String {
    let mut out = header();
    out.push('\n');
    for r in reports {
        out.push_str(&row(r));
        out.push('\n');
    }
    let failed = reports.iter().filter(|r| !r.violations.is_empty()).count();
    let longest = reports
        .iter()
        .map(|r| r.longest_gap)
        .max()
        .unwrap_or_default();
    let _ = writeln!(
        out,
        "total: {} rounds, {} acknowledged, {} lost, {} torn, {} split-brain windows through \
         pgvigil, two nodes writable (asked directly) for {:.1} s in {} windows, longest \
         write gap {:.2} s, {} errors without SQLSTATE, {} rounds with violations",
        reports.len(),
        reports.iter().map(|r| r.acknowledged).sum::<usize>(),
        reports.iter().map(|r| r.lost).max().unwrap_or(0),
        reports.iter().map(|r| r.torn).max().unwrap_or(0),
        reports.iter().map(|r| r.split_brain_windows).sum::<usize>(),
        reports
            .iter()
            .map(|r| r.two_writable.as_secs_f64())
            .sum::<f64>(),
        reports
            .iter()
            .map(|r| r.two_writable_windows)
            .sum::<usize>(),
        longest.as_secs_f64(),
        reports.iter().map(|r| r.no_sqlstate).sum::<usize>(),
        failed
    );
    out
}

#[cfg(test)]
mod tests {
    use super::super::load::Error;
    use super::*;

    fn ack(start: Instant, id: i64, sent_ms: u64, at_ms: u64, port: u16) -> Ack {
        Ack {
            id,
            source: Source::Writer,
            sent: start + Duration::from_millis(sent_ms),
            at: start + Duration::from_millis(at_ms),
            port,
        }
    }

    fn windows(acks: &[Ack]) -> usize {
        let mut report = RoundReport::default();
        check_one_writer(&mut report, &acks.iter().collect::<Vec<_>>());
        report.split_brain_windows
    }

    #[test]
    fn one_switch_is_a_failover_not_a_split_brain() {
        let t = Instant::now();
        let acks = [
            ack(t, 1, 0, 10, 1),
            ack(t, 2, 20, 30, 1),
            ack(t, 3, 40, 900, 2),
        ];
        assert_eq!(windows(&acks), 0);
    }

    #[test]
    fn a_request_sent_before_the_switch_may_finish_on_the_old_node() {
        let t = Instant::now();
        let acks = [
            ack(t, 1, 0, 10, 1),
            ack(t, 2, 100, 200, 2),
            ack(t, 3, 50, 300, 1),
        ];
        assert_eq!(windows(&acks), 0);
    }

    #[test]
    fn new_writes_back_on_the_old_node_are_one_window_per_run() {
        let t = Instant::now();
        let acks = [
            ack(t, 1, 0, 10, 1),
            ack(t, 2, 20, 30, 2),
            ack(t, 3, 40, 50, 1),
            ack(t, 4, 60, 70, 1),
            ack(t, 5, 80, 90, 2),
            ack(t, 6, 100, 110, 1),
        ];
        assert_eq!(windows(&acks), 2);
    }

    #[test]
    fn an_acknowledged_write_missing_on_the_primary_is_lost() {
        let t = Instant::now();
        let mut log = LoadLog::default();
        log.acks.push(ack(t, 1, 0, 10, 1));
        log.acks.push(ack(t, 2, 20, 30, 1));
        log.acks.push(Ack {
            source: Source::Checker,
            ..ack(t, 9, 0, 40, 1)
        });
        let found = Found::parse("1", "9:2").unwrap();
        let mut report = RoundReport::default();
        check_durable(&mut report, &log, &found);
        assert_eq!((report.lost, report.violations.len()), (1, 1));
        let found = Found::parse("1,2", "").unwrap();
        let mut report = RoundReport::default();
        check_durable(&mut report, &log, &found);
        assert_eq!(report.lost, 1, "the checker's transaction is missing");
    }

    #[test]
    fn errors_without_sqlstate_count_only_while_pgvigil_runs() {
        let t = Instant::now();
        let at = |ms| t + Duration::from_millis(ms);
        let error = |ms, failure| Error {
            source: Source::Writer,
            at: at(ms),
            failure,
        };
        let closed = || Failure::NoSqlstate("connection closed".into());
        let log = LoadLog {
            acks: Vec::new(),
            errors: vec![
                error(100, Failure::Sqlstate("57P01".into(), "terminating".into())),
                error(200, Failure::Timeout),
                error(1_500, closed()),
                error(3_500, closed()),
                error(9_000, closed()),
            ],
        };
        let mut report = RoundReport::default();
        check_errors(&mut report, &log, t, &[(at(1_000), at(2_000))]);
        assert_eq!(
            (report.sqlstate_errors, report.timeouts, report.no_sqlstate),
            (1, 1, 1),
            "within the restart and its grace: excused; later: counted"
        );
        assert_eq!(report.violations.len(), 1);
    }

    #[test]
    fn found_rows_parse_and_torn_pairs_are_counted() {
        let found = Found::parse("1,2,3", "7:2,8:1").unwrap();
        assert_eq!(found.ticks.len(), 3);
        let mut report = RoundReport::default();
        check_durable(&mut report, &LoadLog::default(), &found);
        assert_eq!(report.torn, 1);
        assert!(Found::parse("x", "").is_err());
    }
}
