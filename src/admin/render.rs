//! The CLI's human-readable output: plain tables, one line per node.

use std::fmt::Write as _;

use super::api::{ClusterStatus, DryRun, Status};

/// Events shown under the status table (the JSON has them all).
const EVENTS_SHOWN: usize = 10;

/// `pgvigil status` as a table.
pub fn status(status: &Status) -> String {
    let mut out = String::new();
    let primary = match (&status.primary, &status.primary_unavailable) {
        (Some(primary), _) => format!("primary {primary}"),
        (None, Some(reason)) => format!("no primary: {reason}"),
        (None, None) => "no primary".to_owned(),
    };
    let _ = writeln!(out, "topology generation {}, {primary}", status.generation);
    if status.traffic == crate::pause::Traffic::Paused {
        let _ = writeln!(
            out,
            "PAUSED: new transactions wait for `pgvigil resume` ({} sessions in flight, {} held)",
            status.in_flight, status.held
        );
    }
    let rows: Vec<Vec<String>> = status
        .nodes
        .iter()
        .map(|n| {
            let mut note = Vec::new();
            if let Some(why) = &n.fenced {
                note.push(format!("fenced: {why}"));
            }
            if n.detached {
                note.push("detached".to_owned());
            }
            if let Some(by) = &n.promoted_by {
                note.push(format!("promoted by {by}"));
            }
            vec![
                n.name.clone(),
                n.address.clone(),
                n.role.clone(),
                n.health.clone(),
                opt(n.timeline),
                n.lsn.clone().unwrap_or_else(|| "-".into()),
                n.received.clone().unwrap_or_else(|| "-".into()),
                opt(n.lag_bytes),
                format!("{}/{}", n.connections, n.idle_connections),
                note.join("; "),
            ]
        })
        .collect();
    table(
        &mut out,
        &[
            "NODE",
            "ADDRESS",
            "ROLE",
            "HEALTH",
            "TL",
            "LSN",
            "RECEIVED",
            "LAG",
            "CONN/IDLE",
            "NOTE",
        ],
        &rows,
    );
    if let Some(cluster) = &status.cluster {
        instances(&mut out, cluster);
    }
    let recent = status.events.len().saturating_sub(EVENTS_SHOWN);
    if !status.events[recent..].is_empty() {
        out.push_str("\nrecent events (ms since epoch):\n");
        for event in &status.events[recent..] {
            let node = event.node.as_deref().unwrap_or("-");
            // One line per event: an action's output may span several.
            let message = event.message.lines().collect::<Vec<_>>().join(" | ");
            let _ = writeln!(out, "  {} {node}: {message}", event.at_ms);
        }
    }
    out
}

/// The instances' part of `pgvigil status`: this one's standing, and a line per live instance.
fn instances(out: &mut String, cluster: &ClusterStatus) {
    let leader = cluster.leader.as_deref().unwrap_or("none known");
    let _ = write!(
        out,
        "\ninstance {}: {} (leader: {leader})",
        cluster.instance, cluster.standing
    );
    match &cluster.why {
        Some(why) => {
            let _ = writeln!(out, ", {why}");
        }
        None => out.push('\n'),
    }
    if let Some(why) = &cluster.views_unavailable {
        let _ = writeln!(
            out,
            "the instances' views could not be read from etcd: {why}"
        );
        return;
    }
    let rows: Vec<Vec<String>> = cluster
        .instances
        .iter()
        .map(|i| {
            vec![
                i.name.clone(),
                if i.cannot_reach.is_empty() {
                    "-".to_owned()
                } else {
                    i.cannot_reach.join(",")
                },
                i.lost.clone().unwrap_or_else(|| "-".into()),
                i.admin.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    table(
        out,
        &["INSTANCE", "CANNOT REACH", "FINDS LOST", "ADMIN"],
        &rows,
    );
}

/// `pgvigil promote NODE --dry-run` as a table of what the choice weighed.
pub fn dry_run(dry_run: &DryRun) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "replacing primary {} (last known position {})",
        dry_run.primary,
        dry_run.primary_lsn.as_deref().unwrap_or("unknown")
    );
    let rows: Vec<Vec<String>> = dry_run
        .standbys
        .iter()
        .map(|c| {
            let chosen = dry_run.candidate.as_deref() == Some(c.name.as_str());
            vec![
                format!("{}{}", if chosen { "* " } else { "  " }, c.name),
                c.received.clone().unwrap_or_else(|| "-".into()),
                c.replayed.clone().unwrap_or_else(|| "-".into()),
                opt(c.behind_bytes),
                c.sync_state.clone().unwrap_or_else(|| "-".into()),
                c.priority.to_string(),
                c.excluded.clone().unwrap_or_default(),
            ]
        })
        .collect();
    table(
        &mut out,
        &[
            "  NODE", "RECEIVED", "REPLAYED", "BEHIND", "SYNC", "PRIORITY", "EXCLUDED",
        ],
        &rows,
    );
    out
}

fn opt<T: ToString>(value: Option<T>) -> String {
    value.map_or_else(|| "-".into(), |v| v.to_string())
}

/// Left-aligned columns, two spaces apart.
fn table(out: &mut String, header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let text: Vec<String> = cells
            .zip(&widths)
            .map(|(cell, &width)| format!("{cell:<width$}"))
            .collect();
        let _ = writeln!(out, "{}", text.join("  ").trim_end());
    };
    line(&mut header.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
}
