//! Several pgvigil instances with one decider (`[cluster]`): the etcd cluster the instances elect
//! their leader in, this instance's name, and the lease that makes a leader's authority expire.
//! With no `etcd.endpoints` the section is unused and this instance decides alone.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Problem;

/// Shortest `cluster.ttl`: etcd itself grants no lease shorter than about 1.5 s (with its default
/// election timeout), and the leader must fit keepalives and a safety margin into it.
const MIN_TTL: Duration = Duration::from_secs(2);

/// Leader election and shared state on etcd (`[cluster]`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// The etcd cluster (`[cluster.etcd]`).
    pub etcd: EtcdConfig,
    /// This pgvigil instance (`[cluster.instance]`).
    pub instance: InstanceConfig,
    /// Lifetime of the instance's etcd lease (default 10s, at least 2s): a leader that cannot
    /// renew it stops acting on the nodes before it runs out, and another instance may take
    /// over once it has.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            etcd: EtcdConfig::default(),
            instance: InstanceConfig::default(),
            ttl: Duration::from_secs(10),
        }
    }
}

impl ClusterConfig {
    /// Whether the section is used: etcd endpoints are given.
    pub fn enabled(&self) -> bool {
        !self.etcd.endpoints.is_empty()
    }
}

/// How to reach etcd (`[cluster.etcd]`).
#[derive(Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct EtcdConfig {
    /// Client URLs of the etcd members, `http://host:port`, `https://host:port` (TLS, with
    /// `ca_file`) or `host:port` (default none: single instance); all with the same scheme.
    pub endpoints: Vec<String>,
    /// Key prefix of this pgvigil cluster, so that several share one etcd (default `/pgvigil`).
    pub prefix: String,
    /// etcd user when etcd has authentication on (default none).
    pub user: Option<String>,
    /// Password of `user` (default none).
    pub password: Option<String>,
    /// Bound on one request to etcd, connecting included (default 2s, must be > 0).
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// PEM file of the certificate authorities that sign etcd's server certificates (needed
    /// with `https://` endpoints; the host name is checked).
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate, for etcd with `--client-cert-auth` (with `key_file`).
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`.
    pub key_file: Option<PathBuf>,
}

impl EtcdConfig {
    /// Whether the endpoints are `https://` (checked to be all or none).
    pub fn uses_tls(&self) -> bool {
        self.endpoints.iter().any(|e| e.starts_with("https://"))
    }
}

impl Default for EtcdConfig {
    fn default() -> Self {
        Self {
            endpoints: Vec::new(),
            prefix: "/pgvigil".into(),
            user: None,
            password: None,
            timeout: Duration::from_secs(2),
            ca_file: None,
            cert_file: None,
            key_file: None,
        }
    }
}

impl fmt::Debug for EtcdConfig {
    // Passwords must never reach logs, so Debug masks them.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdConfig")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("timeout", &self.timeout)
            .field("ca_file", &self.ca_file)
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .finish()
    }
}

/// This pgvigil instance (`[cluster.instance]`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct InstanceConfig {
    /// Name of this instance in etcd and in logs, unique in the cluster (default: the host
    /// name).
    pub name: Option<String>,
    /// Where the other instances reach this one's admin API, to forward an operator's commands
    /// to the leader (default: `http://` and the bound `admin.listen`, an unspecified address
    /// replaced by the instance name).
    pub admin_url: Option<String>,
}

/// Problems with `[cluster]`.
pub(super) fn check(cluster: &ClusterConfig, problems: &mut Vec<Problem>) {
    if !cluster.enabled() {
        return;
    }
    for (i, endpoint) in cluster.etcd.endpoints.iter().enumerate() {
        let key = format!("cluster.etcd.endpoints[{i}]");
        if endpoint_address(endpoint).is_none() {
            problems.push(Problem::new(
                key,
                format!("{endpoint:?} is not http://host:port, https://host:port or host:port"),
            ));
        } else if endpoint.starts_with("https://") != cluster.etcd.uses_tls() {
            problems.push(Problem::new(
                key,
                "mixes http and https: give every endpoint the same scheme",
            ));
        }
    }
    check_tls(&cluster.etcd, problems);
    let prefix = &cluster.etcd.prefix;
    if !prefix.starts_with('/') || prefix.ends_with('/') {
        problems.push(Problem::new(
            "cluster.etcd.prefix",
            "must start with '/' and not end with one, e.g. \"/pgvigil/main\"",
        ));
    }
    match (&cluster.etcd.user, &cluster.etcd.password) {
        (Some(_), None) => problems.push(Problem::new(
            "cluster.etcd.password",
            "missing: cluster.etcd.user is set, give both or neither",
        )),
        (None, Some(_)) => problems.push(Problem::new(
            "cluster.etcd.user",
            "missing: cluster.etcd.password is set, give both or neither",
        )),
        _ => {}
    }
    if cluster.etcd.timeout.is_zero() {
        problems.push(Problem::new(
            "cluster.etcd.timeout",
            "must be greater than 0",
        ));
    }
    if let Some(name) = &cluster.instance.name {
        let ok = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
        if !ok {
            problems.push(Problem::new(
                "cluster.instance.name",
                "must be letters, digits, '_', '-' or '.'",
            ));
        }
    }
    if let Some(url) = &cluster.instance.admin_url {
        if crate::admin::client::Admin::new(url, None).is_err() {
            problems.push(Problem::new(
                "cluster.instance.admin_url",
                format!("{url:?} is not http://HOST:PORT"),
            ));
        }
    }
    if cluster.ttl < MIN_TTL {
        problems.push(Problem::new(
            "cluster.ttl",
            format!(
                "{:?} is too short, must be at least {MIN_TTL:?}",
                cluster.ttl
            ),
        ));
    }
}

/// Problems with etcd's TLS files: the client configuration is built once here, so a missing or
/// unreadable file is named at start (and on reload).
fn check_tls(etcd: &EtcdConfig, problems: &mut Vec<Problem>) {
    let tls_file = etcd.ca_file.is_some() || etcd.cert_file.is_some() || etcd.key_file.is_some();
    if !etcd.uses_tls() {
        if tls_file {
            problems.push(Problem::new(
                "cluster.etcd.endpoints",
                "TLS files are set but the endpoints are not https://",
            ));
        }
        return;
    }
    if etcd.ca_file.is_none() {
        problems.push(Problem::new(
            "cluster.etcd.ca_file",
            "missing: https:// endpoints need the certificate authority that signs etcd's",
        ));
    } else if etcd.cert_file.is_some() != etcd.key_file.is_some() {
        problems.push(Problem::new(
            "cluster.etcd.cert_file",
            "give cert_file and key_file together, or neither",
        ));
    } else if let Err(e) = crate::tls::etcd_client_config(etcd) {
        problems.push(Problem::new("cluster.etcd", e.to_string()));
    }
}

/// The `host:port` of an etcd endpoint written as `http://host:port[/]`, `https://host:port[/]`
/// or `host:port`.
pub fn endpoint_address(endpoint: &str) -> Option<&str> {
    let address = endpoint
        .strip_prefix("http://")
        .or_else(|| endpoint.strip_prefix("https://"))
        .unwrap_or(endpoint);
    let address = address.strip_suffix('/').unwrap_or(address);
    let (host, port) = address.rsplit_once(':')?;
    let valid =
        !host.is_empty() && !address.contains('/') && port.parse::<u16>().is_ok_and(|p| p > 0);
    valid.then_some(address)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_host_and_port_with_or_without_http() {
        assert_eq!(
            endpoint_address("http://127.0.0.1:2379"),
            Some("127.0.0.1:2379")
        );
        assert_eq!(endpoint_address("etcd1:2379/"), Some("etcd1:2379"));
        assert_eq!(endpoint_address("etcd1"), None);
        assert_eq!(endpoint_address("http://etcd1:0"), None);
        assert_eq!(endpoint_address("http://etcd1:2379/v3"), None);
    }
}
