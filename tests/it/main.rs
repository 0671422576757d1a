//! The integration-test binary: every test here runs against real PostgreSQL servers.

mod abandon_waits;
mod auth;
mod backend_login;
mod bad_input;
mod cancel;
mod cli;
mod cluster_fixture;
mod drivers;
mod failover;
mod failover_safety;
mod lost_transaction;
mod passthrough;
mod pgbench;
mod pooling;
mod read_split;
mod replay;
mod replication;
mod repoint;
mod routing;
mod session_survival;
mod support;
mod tls;
mod transaction_pooling;
mod write_connection;
