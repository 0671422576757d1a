//! A watcher asking every node directly, every [`PERIOD`], whether it accepts writes: answered,
//! not in recovery and `default_transaction_read_only` off. It measures how long two nodes
//! accepted writes at once at the node level (a thawed old primary until pgvigil fences it), a
//! figure the soak reports beside its checks: writes through pgvigil are checked from the acks
//! (see `check`), since a node that is writable but gets nothing from pgvigil splits nothing.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use tokio::time::{timeout, MissedTickBehavior};
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};
use tokio_util::sync::CancellationToken;

/// Time between two samples.
const PERIOD: Duration = Duration::from_millis(200);

/// Bound on connecting to a node, and on its answer: a frozen node counts as not writable.
const ANSWER: Duration = Duration::from_millis(500);

/// What the nodes said at one moment: `true` for a node that accepts writes.
#[derive(Debug, Clone)]
pub struct Sample {
    /// When the sample was complete.
    pub at: Instant,
    /// Per node (cluster order): writable or not (no answer counts as not).
    pub writable: Vec<bool>,
}

/// The watcher task and its samples.
pub struct Watcher {
    samples: Arc<Mutex<Vec<Sample>>>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Watcher {
    /// Starts sampling the nodes on these ports (their real ports, not pgvigil's relays).
    pub fn start(ports: Vec<u16>) -> Watcher {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let task = tokio::spawn(watch(ports, Arc::clone(&samples), stop.clone()));
        Watcher {
            samples,
            stop,
            task,
        }
    }

    /// The samples taken since `t`.
    pub fn since(&self, t: Instant) -> Vec<Sample> {
        let samples = self
            .samples
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        samples.iter().filter(|s| s.at >= t).cloned().collect()
    }

    /// Stops sampling.
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// Windows in which two or more nodes accepted writes, and their total length: a window runs
/// from its first such sample to the first sample after it that had at most one.
pub fn two_writable(samples: &[Sample]) -> (usize, Duration) {
    let mut windows = 0;
    let mut total = Duration::ZERO;
    let mut opened: Option<Instant> = None;
    for sample in samples {
        let split = sample.writable.iter().filter(|&&w| w).count() >= 2;
        match (split, opened) {
            (true, None) => {
                windows += 1;
                opened = Some(sample.at);
            }
            (false, Some(since)) => {
                total += sample.at - since;
                opened = None;
            }
            _ => {}
        }
    }
    if let (Some(since), Some(last)) = (opened, samples.last()) {
        total += last.at - since;
    }
    (windows, total)
}

async fn watch(ports: Vec<u16>, samples: Arc<Mutex<Vec<Sample>>>, stop: CancellationToken) {
    let mut clients: Vec<Option<Client>> = ports.iter().map(|_| None).collect();
    let mut tick = tokio::time::interval(PERIOD);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let asks = clients
            .iter_mut()
            .zip(&ports)
            .map(|(client, &port)| writable(client, port));
        // Together, so that a frozen node delays a sample by ANSWER at most.
        let writable = futures_util::future::join_all(asks).await;
        let sample = Sample {
            at: Instant::now(),
            writable,
        };
        samples
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(sample);
    }
}

/// Whether the node on `port` accepts writes now; drops the connection when it fails.
async fn writable(client: &mut Option<Client>, port: u16) -> bool {
    let answer = timeout(ANSWER, ask(client, port)).await;
    match answer {
        Ok(Ok(writable)) => writable,
        _ => {
            *client = None;
            false
        }
    }
}

async fn ask(client: &mut Option<Client>, port: u16) -> Result<bool, tokio_postgres::Error> {
    if client.as_ref().is_some_and(Client::is_closed) {
        *client = None;
    }
    let client = match client {
        Some(client) => client,
        None => {
            let conninfo = format!("host=127.0.0.1 port={port} user=postgres dbname=postgres");
            let (fresh, connection) = tokio_postgres::connect(&conninfo, NoTls).await?;
            tokio::spawn(connection);
            client.insert(fresh)
        }
    };
    let rows = client
        .simple_query(
            "SELECT NOT pg_is_in_recovery() \
             AND current_setting('default_transaction_read_only') = 'off'",
        )
        .await?;
    Ok(rows.iter().any(|m| match m {
        SimpleQueryMessage::Row(row) => row.get(0) == Some("t"),
        _ => false,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples(start: Instant, states: &[&[bool]]) -> Vec<Sample> {
        (0u64..)
            .zip(states)
            .map(|(i, writable)| Sample {
                at: start + Duration::from_millis(200 * i),
                writable: writable.to_vec(),
            })
            .collect()
    }

    #[test]
    fn two_writable_nodes_open_a_window_until_one_is_left() {
        let t = Instant::now();
        let s = samples(
            t,
            &[
                &[true, false, false],
                &[true, true, false],
                &[true, true, false],
                &[false, true, false],
                &[false, true, true],
            ],
        );
        let (windows, total) = two_writable(&s);
        assert_eq!(windows, 2);
        // 200..600 ms, then the last sample opens a window that has no length yet.
        assert_eq!(total, Duration::from_millis(400));
    }
}
