//! What each instance sees of the nodes, published under its own lease in
//! `<prefix>/members/<name>` (gone with the instance): the leader fails over only when most live
//! instances find the primary lost, so one instance cut off from the primary never triggers a
//! failover.

use serde::{Deserialize, Serialize};

use super::etcd::EtcdError;
use super::Member;

/// One instance's view of the nodes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceView {
    /// The nodes this instance's probes reach.
    pub reaches: Vec<String>,
    /// The primary this instance finds lost (down, and no standby hears from it), if any.
    pub lost: Option<String>,
    /// Where its admin API is reached (`cluster.instance.admin_url`): followers forward
    /// commands there when it leads.
    #[serde(default)]
    pub admin: Option<String>,
}

/// Publishes `view` as this instance's, attached to its `lease`.
pub async fn publish(member: &Member, lease: i64, view: &InstanceView) -> Result<(), EtcdError> {
    let key = format!("{}{}", member.keys.members, member.name);
    let value = serde_json::to_vec(view).unwrap_or_default();
    member.etcd.put(&key, &value, lease).await
}

/// Every live instance's view, by instance name (a view that is not valid JSON counts as an
/// instance that sees nothing lost).
pub async fn read_all(member: &Member) -> Result<Vec<(String, InstanceView)>, EtcdError> {
    let found = member.etcd.get_prefix(&member.keys.members).await?;
    Ok(found
        .into_iter()
        .map(|(key, kv)| {
            let name = key
                .strip_prefix(&member.keys.members)
                .unwrap_or(&key)
                .to_owned();
            (name, serde_json::from_slice(&kv.value).unwrap_or_default())
        })
        .collect())
}

/// Ok when `primary` is lost for a strict majority of the live instances in `views`, counting
/// `me` (which finds it lost now, whatever it published last); else why not.
pub fn majority_lost(
    views: &[(String, InstanceView)],
    me: &str,
    primary: &str,
) -> Result<(), String> {
    let others = views.iter().filter(|(name, _)| name != me);
    let live = 1 + others.clone().count();
    let lost = 1 + others
        .filter(|(_, view)| view.lost.as_deref() == Some(primary))
        .count();
    if 2 * lost > live {
        Ok(())
    } else {
        Err(format!(
            "primary {primary} is lost for {lost} of {live} live pgvigil instances: a failover \
             needs a majority"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(name: &str, lost: Option<&str>) -> (String, InstanceView) {
        let view = InstanceView {
            reaches: Vec::new(),
            lost: lost.map(str::to_owned),
            admin: None,
        };
        (name.to_owned(), view)
    }

    #[test]
    fn a_failover_needs_the_primary_lost_for_most_live_instances() {
        let alone_cut = [view("a", None), view("b", None), view("c", None)];
        assert!(majority_lost(&alone_cut, "a", "pg1").is_err());
        let two = [view("a", None), view("b", Some("pg1")), view("c", None)];
        assert_eq!(majority_lost(&two, "a", "pg1"), Ok(()));
        let other_primary = [view("a", None), view("b", Some("pg2")), view("c", None)];
        assert!(majority_lost(&other_primary, "a", "pg1").is_err());
        // The others' leases expired: the leader is the only live instance.
        assert_eq!(majority_lost(&[], "a", "pg1"), Ok(()));
        let even = [view("a", None), view("b", None)];
        let refusal = majority_lost(&even, "a", "pg1").unwrap_err();
        assert!(refusal.contains("1 of 2 live"), "{refusal}");
    }
}
