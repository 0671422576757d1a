//! Which function calls a read-only statement may contain, and the user's lists.

use super::wordtable::WordTable;

/// A name as written in SQL: unquoted names fold to lower case, quoted ones compare exactly.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) struct Ident<'a> {
    /// The bytes of the name (between the quotes for a quoted one).
    pub(super) text: &'a [u8],
    /// Whether it was a `"quoted identifier"`.
    pub(super) quoted: bool,
}

impl Ident<'_> {
    /// Whether this name denotes `lower`, a lower-case name.
    pub(super) fn is(&self, lower: &[u8]) -> bool {
        if self.quoted {
            self.text == lower
        } else {
            self.text.eq_ignore_ascii_case(lower)
        }
    }
}

/// What calling a function means for routing.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum CallKind {
    /// Known not to write: may run on a replica.
    Read,
    /// Writes or needs the primary.
    Write,
    /// Takes a session-level advisory lock: writes and pins the session to the primary.
    SessionLock,
    /// Not known: treated as writing.
    Unknown,
}

/// The user's `routing.write_functions` and `routing.read_functions`, folded to lower case once.
///
/// An entry `name` matches a call of `name` in any schema; `schema.name` matches only that
/// qualified call. Entries are written as unquoted SQL would fold them (lower case).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FunctionLists {
    write: Vec<Entry>,
    read: Vec<Entry>,
}

/// One configured name, split once at its last dot.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    schema: Option<String>,
    name: String,
}

impl Entry {
    fn parse(configured: &str) -> Entry {
        let folded = configured.trim().to_ascii_lowercase();
        match folded.rsplit_once('.') {
            Some((schema, name)) => Entry {
                schema: Some(schema.to_owned()),
                name: name.to_owned(),
            },
            None => Entry {
                schema: None,
                name: folded,
            },
        }
    }

    fn matches(&self, qualifier: Option<Ident<'_>>, name: Ident<'_>) -> bool {
        let schema_ok = match (&self.schema, qualifier) {
            (None, _) => true,
            (Some(schema), Some(q)) => q.is(schema.as_bytes()),
            (Some(_), None) => false,
        };
        schema_ok && name.is(self.name.as_bytes())
    }
}

impl FunctionLists {
    /// Lists from configuration: functions that write (beat everything) and functions the user
    /// declares read-only (beat only the "unknown function" rule).
    pub fn new<W, R>(write: W, read: R) -> FunctionLists
    where
        W: IntoIterator,
        W::Item: AsRef<str>,
        R: IntoIterator,
        R::Item: AsRef<str>,
    {
        FunctionLists {
            write: write
                .into_iter()
                .map(|s| Entry::parse(s.as_ref()))
                .collect(),
            read: read.into_iter().map(|s| Entry::parse(s.as_ref())).collect(),
        }
    }

    /// What a call of `qualifier.name(` does. Write lists win over read lists, so a user cannot
    /// declare `nextval` read-only by mistake.
    pub(super) fn call_kind(&self, qualifier: Option<Ident<'_>>, name: Ident<'_>) -> CallKind {
        let builtin = match qualifier {
            None => builtin_kind(name),
            Some(q) if q.is(b"pg_catalog") => builtin_kind(name),
            Some(_) => CallKind::Unknown,
        };
        if matches!(builtin, CallKind::Write | CallKind::SessionLock) {
            return builtin;
        }
        if self.write.iter().any(|e| e.matches(qualifier, name)) {
            return CallKind::Write;
        }
        if self.read.iter().any(|e| e.matches(qualifier, name)) {
            return CallKind::Read;
        }
        builtin
    }
}

/// Both built-in lists, hashed for lookups that neither allocate nor compare more than once or
/// twice.
static BUILTINS: WordTable<CallKind, 1024> = WordTable::empty()
    .with_words(BUILTIN_WRITE, CallKind::Write)
    .with_words(BUILTIN_READ, CallKind::Read);

/// Whether `name` starts with the lower-case `prefix` (exactly, if quoted).
fn has_prefix(name: Ident<'_>, prefix: &[u8]) -> bool {
    name.text.get(..prefix.len()).is_some_and(|head| {
        Ident {
            text: head,
            quoted: name.quoted,
        }
        .is(prefix)
    })
}

/// Whether a call of this function takes a session-level advisory lock, which outlives the
/// statement and so pins the session.
pub(super) fn is_session_lock(qualifier: Option<Ident<'_>>, name: Ident<'_>) -> bool {
    qualifier.is_none_or(|q| q.is(b"pg_catalog"))
        && (has_prefix(name, b"pg_advisory_lock") || has_prefix(name, b"pg_try_advisory_lock"))
}

/// The verdict for a built-in (`pg_catalog`) function name.
fn builtin_kind(name: Ident<'_>) -> CallKind {
    if is_session_lock(None, name) {
        return CallKind::SessionLock;
    }
    // The xact and unlock variants still need the node that holds the lock: the primary.
    if has_prefix(name, b"pg_advisory_")
        || has_prefix(name, b"pg_try_advisory_")
        || has_prefix(name, b"lo_")
    {
        return CallKind::Write;
    }
    let listed = if name.quoted {
        BUILTINS.get_exact(name.text)
    } else {
        BUILTINS.get(name.text)
    };
    if let Some(kind) = listed {
        return kind;
    }
    if has_prefix(name, b"json_")
        || has_prefix(name, b"jsonb_")
        || has_prefix(name, b"array_")
        || has_prefix(name, b"regexp_")
    {
        return CallKind::Read;
    }
    CallKind::Unknown
}

/// Built-ins that write, hand out transaction ids, or fail on a standby.
const BUILTIN_WRITE: &[&[u8]] = &[
    b"currval",
    b"lastval",
    b"loread",
    b"lowrite",
    b"nextval",
    b"pg_create_restore_point",
    b"pg_current_xact_id",
    b"pg_current_xact_id_if_assigned",
    b"pg_notify",
    b"pg_switch_wal",
    b"set_config",
    b"setval",
    b"txid_current",
    b"txid_current_if_assigned",
];

/// Built-ins (and type-modifier spellings such as `varchar(10)`) that never write, and the
/// functions of two common extensions that neither write nor leave anything in the session:
/// uuid-ossp's `uuid_generate_*` and pgcrypto's hashing, encryption and random functions.
const BUILTIN_READ: &[&[u8]] = &[
    b"abs",
    b"acos",
    b"age",
    b"armor",
    b"array_agg",
    b"ascii",
    b"asin",
    b"atan",
    b"atan2",
    b"avg",
    b"bernoulli",
    b"bigint",
    b"bit",
    b"bit_and",
    b"bit_length",
    b"bit_or",
    b"bool",
    b"bool_and",
    b"bool_or",
    b"boolean",
    b"bpchar",
    b"btrim",
    b"cardinality",
    b"cbrt",
    b"ceil",
    b"ceiling",
    b"char",
    b"char_length",
    b"character",
    b"character_length",
    b"chr",
    b"clock_timestamp",
    b"coalesce",
    b"col_description",
    b"concat",
    b"concat_ws",
    b"convert",
    b"convert_from",
    b"convert_to",
    b"corr",
    b"cos",
    b"cot",
    b"count",
    b"covar_pop",
    b"covar_samp",
    b"crypt",
    b"cume_dist",
    b"current_database",
    b"current_schema",
    b"current_schemas",
    b"current_setting",
    b"current_time",
    b"current_timestamp",
    b"date",
    b"date_bin",
    b"date_part",
    b"date_trunc",
    b"dearmor",
    b"decimal",
    b"decode",
    b"degrees",
    b"dense_rank",
    b"digest",
    b"div",
    b"encode",
    b"every",
    b"exp",
    b"extract",
    b"first_value",
    b"float",
    b"float4",
    b"float8",
    b"floor",
    b"format",
    b"format_type",
    b"gen_random_bytes",
    b"gen_random_uuid",
    b"gen_salt",
    b"generate_series",
    b"generate_subscripts",
    b"greatest",
    b"grouping",
    b"has_schema_privilege",
    b"has_table_privilege",
    b"hmac",
    b"inet_client_addr",
    b"inet_client_port",
    b"inet_server_addr",
    b"inet_server_port",
    b"initcap",
    b"int",
    b"int2",
    b"int4",
    b"int8",
    b"integer",
    b"interval",
    b"isfinite",
    b"json",
    b"jsonb",
    b"justify_days",
    b"justify_hours",
    b"justify_interval",
    b"lag",
    b"last_value",
    b"lead",
    b"least",
    b"left",
    b"length",
    b"ln",
    b"localtime",
    b"localtimestamp",
    b"log",
    b"log10",
    b"lower",
    b"lpad",
    b"ltrim",
    b"make_date",
    b"make_interval",
    b"make_time",
    b"make_timestamp",
    b"make_timestamptz",
    b"max",
    b"md5",
    b"min",
    b"mod",
    b"now",
    b"nth_value",
    b"ntile",
    b"nullif",
    b"num_nonnulls",
    b"num_nulls",
    b"numeric",
    b"obj_description",
    b"octet_length",
    b"overlay",
    b"percent_rank",
    b"percentile_cont",
    b"percentile_disc",
    b"pg_backend_pid",
    b"pg_database_size",
    b"pg_encoding_to_char",
    b"pg_get_constraintdef",
    b"pg_get_expr",
    b"pg_get_indexdef",
    b"pg_get_userbyid",
    b"pg_get_viewdef",
    b"pg_is_in_recovery",
    b"pg_is_wal_replay_paused",
    b"pg_last_wal_receive_lsn",
    b"pg_last_wal_replay_lsn",
    b"pg_last_xact_replay_timestamp",
    b"pg_postmaster_start_time",
    b"pg_relation_size",
    b"pg_size_pretty",
    b"pg_sleep",
    b"pg_sleep_for",
    b"pg_sleep_until",
    b"pg_table_is_visible",
    b"pg_total_relation_size",
    b"pg_typeof",
    b"pgp_pub_decrypt",
    b"pgp_pub_encrypt",
    b"pgp_sym_decrypt",
    b"pgp_sym_encrypt",
    b"pi",
    b"position",
    b"power",
    b"quote_ident",
    b"quote_literal",
    b"quote_nullable",
    b"radians",
    b"random",
    b"rank",
    b"real",
    b"repeat",
    b"replace",
    b"reverse",
    b"right",
    b"round",
    b"row_number",
    b"row_to_json",
    b"rpad",
    b"rtrim",
    b"sign",
    b"sin",
    b"smallint",
    b"split_part",
    b"sqrt",
    b"starts_with",
    b"statement_timestamp",
    b"stddev",
    b"stddev_pop",
    b"stddev_samp",
    b"string_agg",
    b"string_to_array",
    b"strpos",
    b"substr",
    b"substring",
    b"sum",
    b"system",
    b"tan",
    b"text",
    b"time",
    b"timeofday",
    b"timestamp",
    b"timestamptz",
    b"timetz",
    b"to_char",
    b"to_date",
    b"to_hex",
    b"to_json",
    b"to_jsonb",
    b"to_number",
    b"to_timestamp",
    b"transaction_timestamp",
    b"translate",
    b"trim",
    b"trunc",
    b"unnest",
    b"upper",
    b"uuid_generate_v1",
    b"uuid_generate_v1mc",
    b"uuid_generate_v3",
    b"uuid_generate_v4",
    b"uuid_generate_v5",
    b"uuid_nil",
    b"var_pop",
    b"var_samp",
    b"varbit",
    b"varchar",
    b"variance",
    b"varying",
    b"version",
    b"width_bucket",
];

#[cfg(test)]
mod tests {
    use super::*;

    fn word(s: &str) -> Ident<'_> {
        Ident {
            text: s.as_bytes(),
            quoted: false,
        }
    }

    #[test]
    fn every_builtin_is_found() {
        assert!(
            (BUILTIN_READ.len() + BUILTIN_WRITE.len()) * 4 <= 1024,
            "keep the table sparse"
        );
        for &name in BUILTIN_READ {
            assert_eq!(
                builtin_kind(word(std::str::from_utf8(name).unwrap_or("?"))),
                CallKind::Read
            );
        }
        for &name in BUILTIN_WRITE {
            assert_eq!(
                builtin_kind(word(std::str::from_utf8(name).unwrap_or("?"))),
                CallKind::Write
            );
        }
    }

    #[test]
    fn write_lists_beat_read_lists() {
        let lists = FunctionLists::new(["Audit.Log"], ["nextval", "my_read", "audit.log"]);
        assert_eq!(lists.call_kind(None, word("NEXTVAL")), CallKind::Write);
        assert_eq!(lists.call_kind(None, word("my_read")), CallKind::Read);
        assert_eq!(
            lists.call_kind(Some(word("audit")), word("log")),
            CallKind::Write
        );
        assert_eq!(lists.call_kind(None, word("log")), CallKind::Read);
        assert_eq!(
            lists.call_kind(Some(word("public")), word("lower")),
            CallKind::Unknown
        );
        assert_eq!(
            lists.call_kind(Some(word("PG_CATALOG")), word("lower")),
            CallKind::Read
        );
        assert_eq!(
            lists.call_kind(None, word("pg_try_advisory_lock_shared")),
            CallKind::SessionLock
        );
        assert_eq!(
            lists.call_kind(None, word("pg_advisory_xact_lock")),
            CallKind::Write
        );
        let quoted = Ident {
            text: b"Lower",
            quoted: true,
        };
        assert_eq!(lists.call_kind(None, quoted), CallKind::Unknown);
    }
}
