//! `pgvigil demo`: a local primary with streaming replicas, and pgvigil in front of them, so that a
//! new user can try the proxy with one command.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use crate::config::{AuthMethod, Config, NodeConfig, UserConfig};
use crate::local_cluster::{
    ClusterSpec, LocalCluster, ADMIN_PASSWORD, ADMIN_USER, APP_DB, APP_PASSWORD, APP_USER,
};

/// Builds the cluster in `dir`, serves pgvigil on `port` until Ctrl-C, then stops everything.
pub async fn run(dir: PathBuf, port: u16, replicas: usize) -> ExitCode {
    let base_dir = match prepare_dir(dir) {
        Ok(dir) => dir,
        Err(message) => return fail(&message),
    };
    println!(
        "pgvigil demo: creating a primary and {replicas} streaming replica(s) in {} ...",
        base_dir.display()
    );
    let spec = ClusterSpec::new(&base_dir)
        .replicas(replicas)
        .first_port(5432);
    let cluster = match tokio::task::spawn_blocking(move || LocalCluster::start(spec)).await {
        Ok(Ok(cluster)) => cluster,
        Ok(Err(e)) => return fail(&e.to_string()),
        Err(e) => return fail(&format!("the cluster builder failed: {e}")),
    };
    let config = demo_config(&cluster, port);
    let running = match crate::proxy::start(config).await {
        Ok(running) => running,
        Err(e) => return fail(&e.to_string()),
    };
    print_welcome(&cluster, running.local_addr);
    crate::signals::stop_requested().await;
    println!("\npgvigil demo: stopping pgvigil and the nodes ...");
    running.shutdown().await;
    let _ = tokio::task::spawn_blocking(move || drop(cluster)).await;
    println!("pgvigil demo: stopped.");
    ExitCode::SUCCESS
}

/// The nodes go in `dir/nodes`, rebuilt on every run (the cluster builder wants an empty folder).
fn prepare_dir(dir: PathBuf) -> Result<PathBuf, String> {
    let dir = std::path::absolute(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let nodes = dir.join("nodes");
    if nodes.exists() {
        std::fs::remove_dir_all(&nodes)
            .map_err(|e| format!("cannot clear {}: {e}", nodes.display()))?;
    }
    Ok(nodes)
}

/// A configuration for the local cluster: every node, the demo user, default settings.
pub fn demo_config(cluster: &LocalCluster, port: u16) -> Config {
    let mut config = Config {
        listen: SocketAddr::from(([127, 0, 0, 1], port)),
        ..Config::default()
    };
    config.nodes = cluster
        .nodes()
        .iter()
        .map(|n| NodeConfig {
            name: n.name.clone(),
            host: "127.0.0.1".into(),
            port: n.port,
            ..NodeConfig::default()
        })
        .collect();
    config.users = vec![UserConfig {
        name: APP_USER.into(),
        password: Some(APP_PASSWORD.into()),
        auth: AuthMethod::ScramSha256,
        admin: false,
    }];
    // Probes and failover run as the cluster's superuser; the state file lives with the nodes.
    config.health.user = Some(ADMIN_USER.into());
    config.health.password = Some(ADMIN_PASSWORD.into());
    config.failover.state_dir = Some(cluster.base_dir().join("pgvigil-state"));
    config
}

fn print_welcome(cluster: &LocalCluster, addr: SocketAddr) {
    println!();
    for node in cluster.nodes() {
        println!("  node {:<4} 127.0.0.1:{}", node.name, node.port);
    }
    println!("  pgvigil   {addr}");
    println!();
    println!("Connect through pgvigil:");
    println!(
        "  psql \"host=127.0.0.1 port={} user={APP_USER} password={APP_PASSWORD} dbname={APP_DB}\"",
        addr.port()
    );
    println!();
    if let Some(pid) = cluster.nodes().first().and_then(|n| n.pid()) {
        println!("To watch a failover, kill the primary; a replica takes over within seconds:");
        println!("  kill -9 {pid}");
        println!();
    }
    println!("Press Ctrl-C to stop pgvigil and the nodes.");
}

fn fail(message: &str) -> ExitCode {
    eprintln!("pgvigil demo: {message}");
    ExitCode::FAILURE
}
