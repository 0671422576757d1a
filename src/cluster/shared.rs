//! The state the leader shares in etcd (`<prefix>/state`): the primary and its timeline, the
//! fences, a promotion in progress. Every write is a transaction that first compares the leader
//! key's lease with the writer's, so a deposed leader's late write fails instead of overwriting
//! its successor's. The local state file stays as a cache for starting while etcd is away.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::etcd::{Compare, EtcdError, Operation};
use super::{Leadership, Member, Standing};
use crate::state::PromotionRecord;

/// What the leader shares (JSON in etcd).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedState {
    /// The instance that wrote it.
    pub leader: String,
    /// The epoch of the leadership it was written in (see [`super::Standing::Leader`]): the
    /// writer sends only states the coordinator built while leading in this epoch, so a new
    /// leader never overwrites its predecessor's record with what it saw as a follower.
    pub epoch: i64,
    /// The topology generation it was published with.
    pub generation: u64,
    /// The node that is primary.
    pub primary: Option<String>,
    /// The primary's timeline, as last probed.
    pub timeline: Option<u32>,
    /// Nodes that must get no query.
    pub fenced: Vec<String>,
    /// A promotion asked for and not yet seen to finish.
    pub promoting: Option<PromotionRecord>,
    /// The latest promotion that finished.
    pub last_promotion: Option<PromotionRecord>,
}

/// Why the shared state could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum SharedError {
    /// The leader key is not attached to the writer's lease any more: it was deposed.
    #[error("refused: the leader key is no longer attached to lease {lease}")]
    Deposed {
        /// The writer's lease.
        lease: i64,
    },
    /// etcd could not be asked.
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    /// The state in etcd is not JSON pgvigil wrote.
    #[error("the shared state in etcd is not valid: {0}")]
    Invalid(#[from] serde_json::Error),
}

/// Writes `state` if the leader key is still attached to `lease`.
pub async fn write_guarded(
    member: &Member,
    lease: i64,
    state: &SharedState,
) -> Result<(), SharedError> {
    let value = serde_json::to_vec(state)?;
    let outcome = member
        .etcd
        .txn(
            &[Compare::Lease(member.keys.leader.clone(), lease)],
            &[Operation::Put {
                key: member.keys.state.clone(),
                value,
                lease: 0,
            }],
            &[],
        )
        .await?;
    if outcome.succeeded {
        Ok(())
    } else {
        Err(SharedError::Deposed { lease })
    }
}

/// The shared state in etcd, if any was written.
pub async fn read(member: &Member) -> Result<Option<SharedState>, SharedError> {
    match member.etcd.get(&member.keys.state).await? {
        Some(kv) => Ok(Some(serde_json::from_slice(&kv.value)?)),
        None => Ok(None),
    }
}

/// Writes the latest state the coordinator shared, while this instance leads, until
/// `shutdown`; a write that failed for want of etcd is tried again every `retry`. A refused
/// write makes this instance a follower at once.
pub async fn run_writer(leadership: Arc<Leadership>, shutdown: CancellationToken) {
    let Some(member) = leadership.member() else {
        return;
    };
    let retry = member.ttl / 3;
    let mut wanted = leadership.state.subscribe();
    let mut standing = leadership.subscribe();
    let mut written: Option<SharedState> = None;
    loop {
        let latest = wanted.borrow_and_update().clone();
        if let (
            Some(state),
            Standing::Leader {
                lease,
                deadline,
                epoch,
            },
        ) = (latest, leadership.standing())
        {
            let fresh = written.as_ref() != Some(&state) && state.epoch == epoch;
            if fresh && Instant::now() < deadline {
                match write_guarded(member, lease, &state).await {
                    Ok(()) => {
                        debug!(
                            generation = state.generation,
                            "shared state written to etcd"
                        );
                        written = Some(state);
                    }
                    Err(SharedError::Deposed { lease }) => {
                        warn!(
                            lease,
                            "etcd refused the shared state: another instance leads now"
                        );
                        leadership.set(Standing::Follower {
                            leader: None,
                            why: "etcd refused a write guarded by this instance's lease".into(),
                        });
                    }
                    Err(e) => warn!(error = %e, "could not write the shared state to etcd"),
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = wanted.changed() => if changed.is_err() { return },
            _ = standing.changed() => {}
            _ = tokio::time::sleep(retry.max(Duration::from_millis(100))) => {}
        }
    }
}
