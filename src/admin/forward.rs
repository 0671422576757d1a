//! Commands sent to a follower go to the leading instance: with `[cluster]`, only the leader acts
//! on the nodes, so a follower passes an operator's command on to the leader's admin API (its
//! address is in the leader's published view) and relays the answer. A forwarded command is never
//! forwarded again: an instance that gets one and does not lead refuses it.

use hyper::StatusCode;
use tracing::info;

use super::api::{Command, Done, Refusal};
use super::client::{Admin, ClientError};
use crate::cluster::{views, Standing};
use crate::proxy::Proxy;

/// The header a forwarding follower adds, naming itself.
pub const FORWARDED_BY: &str = "x-pgvigil-forwarded-by";

/// What became of a command this instance may have to pass on.
pub enum Forwarded {
    /// This instance carries it out itself (it leads, decides alone, a dry run, or no leader
    /// is known: the coordinator then refuses with the reason).
    Here,
    /// The leader's answer, or why it could not be had.
    Answered(StatusCode, Result<Done, Refusal>),
}

/// Passes `command` on to the leader when this instance follows one; `token` is the one the
/// operator sent, `forwarded_by` the instance that forwarded it here, if one did.
pub async fn to_leader(
    proxy: &Proxy,
    command: &Command,
    token: Option<String>,
    forwarded_by: Option<&str>,
) -> Forwarded {
    if matches!(command, Command::Promote { dry_run: true, .. }) {
        return Forwarded::Here;
    }
    let (
        Some(member),
        Standing::Follower {
            leader: Some(leader),
            ..
        },
    ) = (proxy.leadership.member(), proxy.leadership.standing())
    else {
        return Forwarded::Here;
    };
    let refused = |code, refused: String, next: String| {
        Forwarded::Answered(code, Err(Refusal::new(refused, next)))
    };
    if let Some(from) = forwarded_by {
        return refused(
            StatusCode::CONFLICT,
            format!(
                "instance {from} forwarded this command here, but {} does not lead: {leader} does",
                member.name
            ),
            "retry: the instances are changing leader".into(),
        );
    }
    let views = match views::read_all(member).await {
        Ok(views) => views,
        Err(e) => {
            return refused(
                StatusCode::BAD_GATEWAY,
                format!("pgvigil instance {leader} leads and decides; its address could not be read from etcd: {e}"),
                format!("send the command to {leader}'s admin API"),
            )
        }
    };
    let url = views
        .into_iter()
        .find(|(name, _)| *name == leader)
        .and_then(|(_, view)| view.admin);
    let Some(url) = url else {
        return refused(
            StatusCode::CONFLICT,
            format!("pgvigil instance {leader} leads and decides; it has not published its admin address"),
            format!("send the command to {leader}'s admin API"),
        );
    };
    info!(command = command.verb(), %leader, %url, "forwarding an admin command to the leader");
    let answer = match Admin::new(&url, token) {
        Ok(admin) => admin.forwarded_by(&member.name).send(command).await,
        Err(e) => Err(e),
    };
    match answer {
        Ok(Ok(mut done)) => {
            done.message = format!("{} (by the leading instance {leader})", done.message);
            Forwarded::Answered(StatusCode::OK, Ok(done))
        }
        Ok(Err(refusal)) => Forwarded::Answered(StatusCode::CONFLICT, Err(refusal)),
        Err(e @ (ClientError::Unreachable { .. } | ClientError::BadUrl(_))) => refused(
            StatusCode::BAD_GATEWAY,
            format!("pgvigil instance {leader} leads and decides, and cannot be reached: {e}"),
            "retry when it is back, or once another instance leads".into(),
        ),
        Err(e) => refused(
            StatusCode::BAD_GATEWAY,
            format!("the leading instance {leader} gave no usable answer: {e}"),
            format!("look at {leader}'s log"),
        ),
    }
}
