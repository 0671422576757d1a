//! The integration-test binary: every test here runs against real PostgreSQL servers.

mod cancel;
mod cluster_fixture;
mod passthrough;
mod support;
