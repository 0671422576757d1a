//! The SQLSTATE codes pgvigil puts in its own ErrorResponses (PostgreSQL docs Appendix A).
//!
//! Clients and drivers act on these codes (retry on 57P01/08006, re-authenticate on 28P01), so
//! each one is chosen to trigger the reaction the situation calls for.

/// The peer broke the wire protocol: malformed or oversized message, unexpected message type.
pub const PROTOCOL_VIOLATION: &str = "08P01";
/// The client asked for something pgvigil does not do (GSSAPI encryption, replication, protocol 2).
pub const FEATURE_NOT_SUPPORTED: &str = "0A000";
/// Authentication cannot even start: unknown user or database, no method allowed.
pub const INVALID_AUTHORIZATION_SPECIFICATION: &str = "28000";
/// Password or SCRAM proof did not verify.
pub const INVALID_PASSWORD: &str = "28P01";
/// insufficient_privilege: e.g. no CONNECT privilege on the database asked for.
pub const INSUFFICIENT_PRIVILEGE: &str = "42501";
/// The client connection limit (global, per user or per database) is reached.
pub const TOO_MANY_CONNECTIONS: &str = "53300";
/// The server connection behind a session was lost mid-transaction, or no node is reachable.
pub const CONNECTION_FAILURE: &str = "08006";
/// pgvigil is shutting down, or the node serving the session was fenced or failed over.
pub const ADMIN_SHUTDOWN: &str = "57P01";
/// No suitable node can take the session yet (failover in progress, primary starting up).
pub const CANNOT_CONNECT_NOW: &str = "57P03";
/// A statement was cancelled by a CancelRequest or a pgvigil timeout.
pub const QUERY_CANCELED: &str = "57014";
/// A bug or invariant violation inside pgvigil.
pub const INTERNAL_ERROR: &str = "XX000";
/// A write reached a session pinned to a read-only target.
pub const READ_ONLY_SQL_TRANSACTION: &str = "25006";
/// A size or count limit was exceeded (message too large, too many prepared statements).
pub const PROGRAM_LIMIT_EXCEEDED: &str = "54000";
/// A statement sent inside a transaction block that already failed (here: whose server connection
/// was lost); only ROLLBACK (or COMMIT, which rolls back) ends it.
pub const IN_FAILED_SQL_TRANSACTION: &str = "25P02";
/// The connection was lost while a COMMIT or an autocommit write was running: it may or may not
/// have committed.
pub const TRANSACTION_RESOLUTION_UNKNOWN: &str = "08007";

/// duplicate_prepared_statement: a Parse or PREPARE reuses a statement name in use.
pub const DUPLICATE_PREPARED_STATEMENT: &str = "42P05";

/// invalid_sql_statement_name: a Bind, Describe or EXECUTE names no prepared statement.
pub const INVALID_SQL_STATEMENT_NAME: &str = "26000";
