//! The integration-test binary: every test here runs against real PostgreSQL servers.

mod auth;
mod cli;
mod cluster_fixture;
mod passthrough;
mod pgbench;
mod support;
mod tls;
