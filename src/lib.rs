//! pgvigil: a PostgreSQL high-availability proxy.
pub mod local_cluster;
