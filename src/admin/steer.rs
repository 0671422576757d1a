//! The operator's commands that change no topology, shared by the admin API, the SQL console
//! and SIGHUP: PAUSE, RESUME and RELOAD. They do not go through the failover coordinator; each
//! is kept in the event log.

use std::time::Duration;

use tracing::info;

use super::api::{Done, EventKind, Refusal};
use crate::proxy::Proxy;

/// How long `pause --wait` waits for the sessions in flight when no bound is given.
pub const DEFAULT_PAUSE_WAIT: Duration = Duration::from_secs(60);

/// Holds every new unit outside a transaction block; with `wait`, also waits (up to that long)
/// until no session is running a unit or inside a transaction block.
pub async fn pause(proxy: &Proxy, wait: Option<Duration>) -> Result<Done, Refusal> {
    let message = if proxy.pause.pause() {
        "paused: new transactions wait for resume"
    } else {
        "already paused"
    };
    info!(message, "pause");
    proxy.events.push(EventKind::Command, None, message);
    let Some(wait) = wait else {
        return Ok(done(format!(
            "{message}; {} sessions in flight",
            proxy.pause.in_flight()
        )));
    };
    let left = proxy
        .pause
        .until_idle(tokio::time::Instant::now() + wait)
        .await;
    if left == 0 {
        Ok(done(format!("{message}; no session in flight")))
    } else {
        Err(Refusal::new(
            format!(
                "paused, but {left} sessions are still in a transaction after {}",
                humantime::format_duration(wait)
            ),
            "wait again with `pgvigil pause --wait`, or `pgvigil resume`",
        ))
    }
}

/// Releases the held units.
pub fn resume(proxy: &Proxy) -> Done {
    let message = if proxy.pause.resume() {
        "resumed: held transactions go on"
    } else {
        "not paused"
    };
    info!(message, "resume");
    proxy.events.push(EventKind::Command, None, message);
    done(message.to_owned())
}

/// Reads the configuration file again and applies what may change live (see `reload`).
pub async fn reload(proxy: &Proxy) -> Result<Done, Refusal> {
    match crate::reload::reload(proxy).await {
        Ok(reloaded) => Ok(done(reloaded.summary())),
        Err(error) => Err(Refusal::new(
            format!("reload refused, the running configuration stays: {error}"),
            "fix the configuration file and reload again",
        )),
    }
}

fn done(message: String) -> Done {
    Done {
        message,
        dry_run: None,
        write_pause_ms: None,
    }
}
