//! The integration-test binary: every test here runs against real PostgreSQL servers.

mod bad_input;
mod cluster_fixture;
mod passthrough;
mod pooling;
mod support;
