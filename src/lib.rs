//! pgvigil: a PostgreSQL high-availability proxy.
