//! pgvigil: a PostgreSQL high-availability proxy.

pub mod config;
