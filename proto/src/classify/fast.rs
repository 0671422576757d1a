//! The fast paths for the commonest read and writes: one plain SELECT of names, numbers,
//! parameters and comparison operators, such as `SELECT abalance FROM pgbench_accounts WHERE aid
//! = $1;`, one plain INSERT, UPDATE or DELETE (see [`plain_write`]), such as pgbench's
//! `UPDATE pgbench_tellers SET tbalance = tbalance + -3 WHERE tid = 7;`, and a lone `BEGIN`,
//! `COMMIT` or `ROLLBACK` (see [`lone_tx_word`]).
//!
//! One pass over the bytes, sixteen at a time (see [`Marks`]: only the bytes that are not plain
//! words, spaces or `= < > , . *`, and the words that may be numbers or blocking words, are
//! looked at one by one), proves that the full lexer and statement machine would find nothing
//! to object to: no parenthesis (so no function call, subquery or CTE body), no comment, literal,
//! quoted identifier or dollar quote (so no hint and no hidden `;`), no byte outside ASCII, at
//! most one `;` and only at the end, and none of the words that make a SELECT write or lock
//! (`FOR`, `INTO`, `INSERT`, `UPDATE`, `DELETE`, `MERGE`). Anything else returns `None` and
//! takes the full path; the answer, when there is one, is the full path's (see the proptest in
//! `tests.rs`).

use super::blocks::{is_word, word_end, Marks};
use super::lexer::is_space;
use super::{Classification, Reason, TxControl};

/// The classification of a plain SELECT when `sql` is one; `None` when it needs the full path.
pub(super) fn plain_select(sql: &[u8]) -> Option<Classification> {
    let start = sql.iter().position(|&b| !is_space(b))?;
    let text = &sql[start..];
    // A word glued to `select` is part of it: no longer SELECT.
    if !starts_with_word(text, b"select") {
        return None;
    }
    // Only the bytes and words that may matter are looked at (see `Marks`).
    for pos in Marks::new(text, 6) {
        let byte = text[pos];
        if is_word(byte) {
            if !plain_word(text, pos) {
                return None;
            }
            continue;
        }
        // Only a final `;` may follow (the string holds one statement).
        let last = byte == b';' && text[pos + 1..].iter().all(|&b| is_space(b));
        return last.then_some(READ);
    }
    Some(READ)
}

/// Reserved words a plain write may put before `(`: none can name a function.
const NO_CALL: [&[u8]; 5] = [b"values", b"in", b"where", b"and", b"or"];

/// The classification of one plain INSERT, UPDATE or DELETE when `sql` is one; `None` when it
/// needs the full path. It writes anyway, so what the full path could still find is a call
/// (which may pin the session or be of unknown code: any `name(` takes the full path, but for a
/// word of [`NO_CALL`] and the table of a leading `INSERT INTO table (`), a hint or a failure (no
/// comment, literal, quoted identifier or dollar quote; parentheses must balance), or more
/// statements (at most one `;`, at the end). Beyond the plain SELECT's alphabet it takes `(`,
/// `)`, `+` and a `-` not followed by another.
pub(super) fn plain_write(sql: &[u8]) -> Option<Classification> {
    let start = sql.iter().position(|&b| !is_space(b))?;
    let text = &sql[start..];
    let insert = starts_with_word(text, b"insert");
    if !(insert || starts_with_word(text, b"update") || starts_with_word(text, b"delete")) {
        return None;
    }
    // Where the name of `INSERT INTO [schema.]table` ends: a `(` there opens the column list.
    let table_end = if insert { insert_table_end(text) } else { None };
    // As the full path counts them: a `)` too many is forgotten.
    let mut depth = 0u32;
    // Only the bytes and words that may matter are looked at (see `Marks`).
    for pos in Marks::new(text, 6) {
        let byte = text[pos];
        match byte {
            _ if is_word(byte) => {
                if !number_or_name(text, pos) {
                    return None;
                }
            }
            b'(' => {
                // The word the last token was, if it was one, may be called.
                if let Some(word) = word_before(text, pos) {
                    let list = Some(word.end) == table_end
                        || NO_CALL
                            .iter()
                            .any(|w| text[word.clone()].eq_ignore_ascii_case(w));
                    if !list {
                        return None;
                    }
                }
                depth += 1;
            }
            b')' => depth = depth.saturating_sub(1),
            b'+' => {}
            b'-' if text.get(pos + 1) != Some(&b'-') => {}
            b';' if text[pos + 1..].iter().all(|&b| is_space(b)) => break,
            _ => return None,
        }
    }
    (depth == 0).then_some(Classification::ONE_WRITE)
}

/// The word that ends at the last byte before `pos` in `text` that is not whitespace, if one
/// does after the statement's first word (which ends at 6).
fn word_before(text: &[u8], pos: usize) -> Option<std::ops::Range<usize>> {
    let end = text[..pos].iter().rposition(|&b| !is_space(b))? + 1;
    let start = text[..end].iter().rposition(|&b| !is_word(b))? + 1;
    (start < end).then_some(start..end)
}

/// Where the table name ends in `text`, which starts with `INSERT`, when `INTO [schema.]table`
/// follows it (words of the fast path's alphabet, no space around the dot).
fn insert_table_end(text: &[u8]) -> Option<usize> {
    let skip_space = |from: usize| from + text[from..].iter().take_while(|&&b| is_space(b)).count();
    let into = skip_space(6);
    let into_end = word_end(text, into);
    if into == 6 || !text[into..into_end].eq_ignore_ascii_case(b"into") {
        return None;
    }
    let table = skip_space(into_end);
    let mut end = word_end(text, table);
    if table == into_end || end == table {
        return None;
    }
    if text.get(end) == Some(&b'.') && word_end(text, end + 1) > end + 1 {
        end = word_end(text, end + 1);
    }
    Some(end)
}

/// The classification of a transaction-control statement of one word (`BEGIN`, `COMMIT`, `END`,
/// `ROLLBACK` or `ABORT`, with an optional final `;`), as drivers and ORMs send around every
/// transaction; `None` for anything else.
pub(super) fn lone_tx_word(sql: &[u8]) -> Option<Classification> {
    let text = sql.trim_ascii();
    let word = text.strip_suffix(b";").unwrap_or(text).trim_ascii_end();
    let is = |w: &[u8]| word.eq_ignore_ascii_case(w);
    let tx = match word.len() {
        3 if is(b"end") => TxControl::Commit,
        5 if is(b"begin") => TxControl::Begin { read_only: None },
        5 if is(b"abort") => TxControl::Rollback,
        6 if is(b"commit") => TxControl::Commit,
        8 if is(b"rollback") => TxControl::Rollback,
        _ => return None,
    };
    // BEGIN without an access mode is not a read by itself (the session's default decides).
    let begin = matches!(tx, TxControl::Begin { .. });
    Some(Classification {
        read_only: !begin,
        reason: begin.then_some(Reason::Statement),
        tx: Some(tx),
        ..Classification::ONE_WRITE
    })
}

/// Whether `text` starts with the word `word` (six small letters) in any case, not glued to
/// more word bytes. Letters compare folded four and two bytes at once: `| 0x20` maps only a
/// letter's two cases onto its small one. ([`folded`]'s byte loop, called here, cost about 1.1k
/// instructions per tpcb-like transaction.)
fn starts_with_word(text: &[u8], word: &[u8; 6]) -> bool {
    let folded = |bytes: &[u8; 6]| {
        u64::from(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])) << 16
            | u64::from(u16::from_le_bytes([bytes[4], bytes[5]]))
    };
    match text.first_chunk::<6>() {
        Some(head) => {
            folded(head) | 0x2020_2020_2020 == folded(word)
                && !text.get(6).is_some_and(|&b| is_word(b))
        }
        None => false,
    }
}

/// Whether the word that starts at `pos` in `text` lexes as the fast path assumes and names
/// nothing that matters.
fn plain_word(text: &[u8], pos: usize) -> bool {
    match text[pos] {
        b'0'..=b'9' | b'$' => number_or_name(text, pos),
        // Only words of three to six bytes whose first letter starts one of them are folded.
        first if matches!(first | 0x20, b'f' | b'i' | b'u' | b'd' | b'm') => {
            let word = &text[pos..word_end(text, pos)];
            !(3..=6).contains(&word.len()) || !BLOCKING.contains(&folded(word))
        }
        _ => true,
    }
}

/// Whether the word that starts at `pos` in `text` lexes as one token: a number or a parameter
/// (`$1`) is digits only (`1into` lexes as `1` and `into`, `$a$` opens a dollar quote); a name
/// is anything else.
fn number_or_name(text: &[u8], pos: usize) -> bool {
    let digits = match text[pos] {
        b'0'..=b'9' => pos,
        b'$' => pos + 1,
        _ => return true,
    };
    let end = digits
        + text[digits..]
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .count();
    end > digits && !text.get(end).is_some_and(|&b| is_word(b))
}

/// Up to 8 bytes of a word in one integer, ASCII letters folded to small ones (`| 0x20` maps no
/// other byte of a word, digits, `_` or `$`, onto a letter).
const fn folded(word: &[u8]) -> u64 {
    let mut out = 0u64;
    let mut i = 0;
    while i < word.len() && i < 8 {
        out = out << 8 | (word[i] | 0x20) as u64;
        i += 1;
    }
    out
}

/// FOR (row locks), INTO (SELECT INTO), INSERT, UPDATE, DELETE and MERGE, folded.
const BLOCKING: [u64; 6] = [
    folded(b"for"),
    folded(b"into"),
    folded(b"insert"),
    folded(b"update"),
    folded(b"delete"),
    folded(b"merge"),
];

/// One read-only statement with nothing else to report.
const READ: Classification = Classification {
    read_only: true,
    reason: None,
    ..Classification::ONE_WRITE
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_selects_take_the_fast_path() {
        for sql in [
            "SELECT abalance FROM pgbench_accounts WHERE aid = 123;",
            "SELECT abalance FROM pgbench_accounts WHERE aid = $1",
            "  select a.b, c FROM t a WHERE x >= 1.5 AND y <> $12 ;  ",
            "SELECT * FROM t",
            "SELECT 1",
            "select",
        ] {
            assert_eq!(plain_select(sql.as_bytes()), Some(READ), "{sql}");
        }
    }

    #[test]
    fn plain_writes_take_the_fast_path() {
        for sql in [
            "UPDATE pgbench_accounts SET abalance = abalance + -4321 WHERE aid = 1234;",
            "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) \
             VALUES (3, 1, 1234, -4321, CURRENT_TIMESTAMP);",
            "  delete FROM t WHERE a = $1 AND b < 2.5 ;  ",
            "insert into t values ((1), (2))",
        ] {
            assert_eq!(
                plain_write(sql.as_bytes()),
                Some(Classification::ONE_WRITE),
                "{sql}"
            );
        }
    }

    #[test]
    fn lone_transaction_words_take_the_fast_path() {
        use super::super::{classify_full, FunctionLists};
        let lists = FunctionLists::default();
        for sql in [
            "BEGIN",
            "begin;",
            " COMMIT ; ",
            "end",
            "Rollback;",
            "ABORT\n",
        ] {
            let fast = lone_tx_word(sql.as_bytes());
            assert!(fast.is_some(), "{sql:?}");
            assert_eq!(fast, Some(classify_full(sql.as_bytes(), &lists)), "{sql:?}");
        }
        for sql in [
            "BEGIN;;",
            "BEGIN READ ONLY",
            "COMMIT PREPARED 'x'",
            "ROLLBACK TO s",
            "BEGIN -- c",
            "/* pgvigil:replica */ COMMIT",
            "END\x0b",
            "beginx",
            "",
        ] {
            assert_eq!(lone_tx_word(sql.as_bytes()), None, "{sql:?}");
        }
    }

    #[test]
    fn writes_that_may_pin_hide_or_fail_take_the_full_path() {
        for sql in [
            "UPDATE t SET a = pg_advisory_lock(1)",
            "update t set a = PG_TRY_ADVISORY_LOCK(1)",
            "UPDATE t SET a = pg_catalog.pg_advisory_lock(1)",
            "UPDATE t SET a = 1; SET x = 1",
            "UPDATE t SET a = 1;;",
            "UPDATE t SET a = 1 -- c",
            "UPDATE t SET a = 1 /* c */",
            "UPDATE t SET a = 'x'",
            "UPDATE t SET a = $a$x$a$",
            "UPDATE t SET a = \"b\"",
            "UPDATE t SET a = b::int",
            "INSERT INTO t VALUES (1",
            "INSERT INTO t VALUES (1))(",
            "UPDATEx SET a = 1",
            "/* pgvigil:replica */ UPDATE t SET a = 1",
            "WITH x AS (SELECT 1) UPDATE t SET a = 1",
            "SELECT 1",
        ] {
            assert_eq!(plain_write(sql.as_bytes()), None, "{sql}");
        }
    }

    #[test]
    fn reads_that_only_look_plain_still_route_to_the_primary() {
        use super::super::{classify, FunctionLists, Pin, Reason};
        let lists = FunctionLists::default();
        for (sql, reason, pin) in [
            ("SELECT * FROM t FOR UPDATE", Reason::RowLock, None),
            ("SELECT nextval('s')", Reason::WriteFunction, None),
            (
                "WITH t AS (INSERT INTO u VALUES (1) RETURNING *) SELECT * FROM t",
                Reason::DataModifying,
                None,
            ),
            (
                "SELECT pg_advisory_lock(1)",
                Reason::WriteFunction,
                Some(Pin::AdvisoryLock),
            ),
            (
                "select set_config('a.b', 'c', false)",
                Reason::WriteFunction,
                None,
            ),
            ("SELECT a INTO b FROM t", Reason::SelectInto, None),
        ] {
            let c = classify(sql.as_bytes(), &lists);
            assert!(!c.read_only, "{sql}");
            assert_eq!((c.reason, c.pin), (Some(reason), pin), "{sql}");
        }
    }

    #[test]
    fn every_blocking_word_in_any_case_takes_the_full_path() {
        for word in ["for", "into", "insert", "update", "delete", "merge"] {
            for spelt in [word.to_owned(), word.to_uppercase()] {
                let sql = format!("SELECT a {spelt} b");
                assert_eq!(plain_select(sql.as_bytes()), None, "{sql}");
            }
        }
    }

    #[test]
    fn anything_that_may_write_lock_pin_or_hide_takes_the_full_path() {
        for sql in [
            "SELECT * FROM t FOR UPDATE",
            "SELECT * FROM t for share",
            "SELECT nextval('s')",
            "SELECT pg_advisory_lock(1)",
            "select set_config('a.b', 'c', false)",
            "SELECT a INTO b FROM t",
            "SELECT a INTO TEMP b FROM t",
            "SELECT 1into",
            "SELECT 1; DELETE FROM t",
            "SELECT 1;;",
            "SELECT $a$x$a$",
            "SELECT a FROM t WHERE b = 'x'",
            "SELECT \"a\" FROM t",
            "SELECT 1 -- c",
            "SELECT 1 /* c */",
            "SELECT 1 - 1",
            "SELECT a::int FROM t",
            "SELECT é FROM t",
            "SELECTa FROM t",
            "select$1",
            "WITH t AS (INSERT INTO u VALUES (1) RETURNING *) SELECT * FROM t",
            "/* pgvigil:primary */ SELECT 1",
            "INSERT INTO t VALUES (1)",
            "UPDATE t SET a = 1",
            "BEGIN",
            "",
            "   ",
        ] {
            assert_eq!(plain_select(sql.as_bytes()), None, "{sql}");
        }
    }
}
