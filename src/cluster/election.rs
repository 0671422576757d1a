//! Leader election on an etcd lease, Patroni's way: each instance holds one lease and renews it
//! every TTL/3; the leader key is created only if absent (`create_revision == 0`) and attached to
//! the creator's lease, so it vanishes when that lease expires. A leader trusts its lease only
//! until [`deadline`]: etcd counts the TTL from when it handled the renewal, which is after we
//! sent it, so counting from the send time errs on the safe side.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::etcd::{Compare, EtcdError, Operation};
use super::views::{self, InstanceView};
use super::{Leadership, Standing};

/// Until when a leader may act after etcd acknowledged a renewal sent at `sent` that gave the
/// lease `ttl` again: `sent + ttl - margin`, the margin (a fifth of the TTL) covering clock rate
/// differences and the time an action already under way takes to land.
pub fn deadline(sent: Instant, ttl: Duration) -> Instant {
    sent + ttl - ttl / 5
}

/// One instance's side of the election: its lease, renewed and used to hold the leader key.
pub struct Elector {
    leadership: Arc<Leadership>,
    lease: Option<i64>,
    /// The view last published, and the lease it hangs on.
    published: Option<(i64, InstanceView)>,
}

impl Elector {
    /// An elector for `leadership`, which must have a member (a `[cluster]` section).
    pub fn new(leadership: Arc<Leadership>) -> Elector {
        Elector {
            leadership,
            lease: None,
            published: None,
        }
    }

    /// One round: renew (or grant) the lease, then take the leader key if nobody holds it, or
    /// see who does. The standing it finds is published and returned; on an etcd error the
    /// standing stays as it was (a leader's deadline runs out by itself) and the error is
    /// returned.
    pub async fn cycle(&mut self) -> Result<Standing, EtcdError> {
        let leadership = self.leadership.clone();
        let Some(member) = leadership.member() else {
            return Ok(Standing::Alone);
        };
        let sent = Instant::now();
        let renewed = match self.lease {
            Some(id) => member.etcd.lease_keepalive(id).await?.map(|ttl| (id, ttl)),
            None => None,
        };
        let (lease, ttl) = match renewed {
            Some(renewed) => renewed,
            None => {
                if let Some(expired) = self.lease.take() {
                    warn!(
                        lease = expired,
                        "this instance's etcd lease expired; asking for a new one"
                    );
                }
                let asked = i64::try_from(member.ttl.as_secs().max(1)).unwrap_or(i64::MAX);
                let grant = member.etcd.lease_grant(asked).await?;
                (grant.id, grant.ttl)
            }
        };
        self.lease = Some(lease);
        let valid_until = deadline(sent, Duration::from_secs(ttl.max(0).unsigned_abs()));
        let key = &member.keys.leader;
        let outcome = member
            .etcd
            .txn(
                &[Compare::Absent(key.clone())],
                &[Operation::Put {
                    key: key.clone(),
                    value: member.name.clone().into_bytes(),
                    lease,
                }],
                &[Operation::Get(key.clone())],
            )
            .await?;
        let holder = outcome.read.first().cloned().flatten();
        let standing = match holder {
            _ if outcome.succeeded => Standing::Leader {
                lease,
                epoch: outcome.revision,
                deadline: valid_until,
            },
            Some(kv) if kv.lease == lease => Standing::Leader {
                lease,
                epoch: kv.create_revision,
                deadline: valid_until,
            },
            Some(kv) => Standing::Follower {
                leader: Some(String::from_utf8_lossy(&kv.value).into_owned()),
                why: "another instance holds the leader key".into(),
            },
            None => Standing::Follower {
                leader: None,
                why: "the leader key vanished between two requests".into(),
            },
        };
        self.leadership.set(standing.clone());
        self.publish_view().await?;
        Ok(standing)
    }

    /// Publishes this instance's latest view under its lease, if it changed since (or the lease
    /// did).
    pub async fn publish_view(&mut self) -> Result<(), EtcdError> {
        let leadership = self.leadership.clone();
        let (Some(member), Some(lease)) = (leadership.member(), self.lease) else {
            return Ok(());
        };
        let Some(view) = leadership.view.borrow().clone() else {
            return Ok(());
        };
        let fresh = Some((lease, view));
        if self.published == fresh {
            return Ok(());
        }
        if let Some((lease, view)) = &fresh {
            views::publish(member, *lease, view).await?;
        }
        self.published = fresh;
        Ok(())
    }

    /// Gives the lease back, so that another instance can lead at once instead of after a TTL.
    pub async fn resign(&mut self) {
        let Some(lease) = self.lease.take() else {
            return;
        };
        if let Some(member) = self.leadership.member() {
            match member.etcd.lease_revoke(lease).await {
                Ok(()) => info!(lease, "etcd lease given back"),
                Err(e) => {
                    warn!(lease, error = %e, "could not give the etcd lease back; it expires by itself")
                }
            }
        }
        self.leadership.set(Standing::Follower {
            leader: None,
            why: "this instance is stopping".into(),
        });
    }
}

/// Runs the election until `shutdown`: a round every TTL/3, then the lease is given back.
pub async fn run(leadership: Arc<Leadership>, shutdown: CancellationToken) {
    let Some(member) = leadership.member() else {
        return;
    };
    let period = member.ttl / 3;
    let mut elector = Elector::new(leadership.clone());
    let mut view = leadership.view.subscribe();
    let mut failing = false;
    loop {
        match elector.cycle().await {
            Ok(_) => {
                if failing {
                    info!("etcd answers again");
                }
                failing = false;
            }
            Err(e) => {
                if !failing {
                    warn!(error = %e, "etcd did not answer the election round; a leader stops acting when its lease runs out");
                }
                failing = true;
                if let Standing::Follower { leader, .. } = leadership.standing() {
                    leadership.set(Standing::Follower {
                        leader,
                        why: format!("etcd unreachable: {e}"),
                    });
                }
            }
        }
        // A changed view is published at once: the leader counts the views before failing over.
        let next = tokio::time::Instant::now() + period;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => {
                    elector.resign().await;
                    return;
                }
                _ = tokio::time::sleep_until(next) => break,
                changed = view.changed() => {
                    if changed.is_err() {
                        tokio::time::sleep_until(next).await;
                        break;
                    }
                    if let Err(e) = elector.publish_view().await {
                        warn!(error = %e, "could not publish this instance's view to etcd");
                    }
                }
            }
        }
    }
}
