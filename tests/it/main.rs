//! The integration-test binary: every test here runs against real PostgreSQL servers.

mod auth;
mod backend_login;
mod bad_input;
mod cancel;
mod cli;
mod cluster_fixture;
mod failover;
mod lost_transaction;
mod passthrough;
mod pgbench;
mod pooling;
mod read_split;
mod replay;
mod replication;
mod routing;
mod session_survival;
mod support;
mod tls;
mod write_connection;
