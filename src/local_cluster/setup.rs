//! Building the cluster: initdb the primary, create the test roles, clone and attach replicas.

use std::path::Path;
use std::time::{Duration, Instant};

use super::conf::{self, SharedSettings};
use super::node::LocalNode;
use super::{
    os_user, ports, ClusterError, ADMIN_PASSWORD, ADMIN_USER, APP_DB, APP_PASSWORD, APP_USER,
    MD5_PASSWORD, MD5_USER,
};

/// How long replicas may take to start streaming, and sync replication to engage.
const REPLICATION_DEADLINE: Duration = Duration::from_secs(60);

/// How often replication state is polled.
const REPLICATION_POLL: Duration = Duration::from_millis(100);

/// Startup attempts when another process grabs our port between probe and bind.
const BIND_ATTEMPTS: usize = 3;

/// Creates the primary's data dir with initdb and writes its configuration.
pub(crate) fn init_primary(
    primary: &LocalNode,
    shared: &SharedSettings<'_>,
) -> Result<(), ClusterError> {
    let tools = primary.tools();
    let mut args = vec![
        "-D".as_ref(),
        primary.data_dir.as_os_str(),
        "-U".as_ref(),
        "postgres".as_ref(),
        "--auth-local=trust".as_ref(),
        "--auth-host=scram-sha-256".as_ref(),
        "-E".as_ref(),
        "UTF8".as_ref(),
        "--locale=C".as_ref(),
    ];
    if shared.fast {
        args.push("--no-sync".as_ref());
    }
    tools.run("initdb", args)?;
    conf::configure_new_data_dir(&primary.data_dir, shared, tools.run_as())
}

/// Copies the TLS certificate and key into the primary's data dir as server.crt and server.key
/// (PostgreSQL's defaults), readable only by the server's user as it requires; pg_basebackup then
/// copies them to the replicas.
pub(crate) fn install_tls_files(
    primary: &LocalNode,
    cert: &Path,
    key: &Path,
) -> Result<(), ClusterError> {
    let owner = primary.tools().run_as();
    for (from, name) in [(cert, "server.crt"), (key, "server.key")] {
        let to = primary.data_dir.join(name);
        std::fs::copy(from, &to).map_err(|e| {
            ClusterError::io(format!("copying {} to {}", from.display(), to.display()), e)
        })?;
        std::fs::set_permissions(&to, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .map_err(|e| ClusterError::io(format!("chmod {}", to.display()), e))?;
        os_user::give_to(owner, &to)?;
    }
    Ok(())
}

/// Creates `app` (SCRAM password), `app_md5` (md5 password), the superuser `pgvigil_admin`
/// (SCRAM password) and database `app` owned by `app`.
pub(crate) fn create_roles(primary: &LocalNode) -> Result<(), ClusterError> {
    primary.psql(&format!(
        "CREATE ROLE {APP_USER} LOGIN PASSWORD '{APP_PASSWORD}'; \
         CREATE ROLE {ADMIN_USER} SUPERUSER LOGIN PASSWORD '{ADMIN_PASSWORD}'; \
         SET password_encryption = 'md5'; \
         CREATE ROLE {MD5_USER} LOGIN PASSWORD '{MD5_PASSWORD}'"
    ))?;
    // CREATE DATABASE cannot run inside the implicit transaction of a multi-statement query.
    primary.psql(&format!("CREATE DATABASE {APP_DB} OWNER {APP_USER}"))?;
    Ok(())
}

/// Makes `replica` a streaming copy of `primary` through a slot named after the replica.
pub(crate) fn clone_replica(
    primary: &LocalNode,
    replica: &LocalNode,
    fast: bool,
) -> Result<(), ClusterError> {
    let slot = &replica.name;
    // A node cloned again (LocalCluster::reclone) may find its slot already there.
    primary.psql(&format!(
        "SELECT pg_create_physical_replication_slot('{slot}') WHERE NOT EXISTS \
         (SELECT 1 FROM pg_replication_slots WHERE slot_name = '{slot}')"
    ))?;
    // application_name lands in the primary_conninfo that -R writes, so pg_stat_replication on
    // the primary names the replica.
    let source = format!(
        "host=127.0.0.1 port={} user=postgres application_name={slot}",
        primary.port
    );
    let mut args = vec![
        "-d".as_ref(),
        source.as_ref(),
        "-D".as_ref(),
        replica.data_dir.as_os_str(),
        "-R".as_ref(),
        "-S".as_ref(),
        slot.as_ref(),
        "-X".as_ref(),
        "stream".as_ref(),
        "-c".as_ref(),
        "fast".as_ref(),
    ];
    if fast {
        args.push("--no-sync".as_ref());
    }
    replica.tools().run("pg_basebackup", args)?;
    Ok(())
}

/// Starts a new node, moving it to another free port if someone else bound its port first.
pub(crate) fn start_new_node(node: &mut LocalNode) -> Result<(), ClusterError> {
    let mut attempt = 1;
    loop {
        match node.start() {
            Err(ClusterError::Exited { log_tail, .. })
                if attempt < BIND_ATTEMPTS && log_tail.contains("could not bind") =>
            {
                node.set_port(ports::reserve(None)?);
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// Waits until `expected` standbys stream from `primary`.
pub(crate) fn wait_streaming(primary: &LocalNode, expected: usize) -> Result<(), ClusterError> {
    wait_count(
        primary,
        "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'",
        expected,
        "streaming standbys",
    )
}

/// Waits until `primary` has a synchronous standby.
pub(crate) fn wait_sync_standby(primary: &LocalNode) -> Result<(), ClusterError> {
    wait_count(
        primary,
        "SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'",
        1,
        "synchronous standbys",
    )
}

fn wait_count(
    primary: &LocalNode,
    sql: &str,
    expected: usize,
    what: &'static str,
) -> Result<(), ClusterError> {
    let deadline = Instant::now() + REPLICATION_DEADLINE;
    loop {
        let seen: usize = primary.psql(sql)?.parse().unwrap_or(0);
        if seen >= expected {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(ClusterError::ReplicationTimeout {
                what,
                expected,
                seen,
                seconds: REPLICATION_DEADLINE.as_secs(),
            });
        }
        std::thread::sleep(REPLICATION_POLL);
    }
}
