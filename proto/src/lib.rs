//! PostgreSQL v3 wire-protocol framing for pgvigil: bytes in, borrowed views and bytes out.
