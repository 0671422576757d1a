//! pgvigil: a PostgreSQL high-availability proxy.

pub mod auth;
pub mod tls;
