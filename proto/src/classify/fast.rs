//! The fast paths for the commonest read and writes: one plain SELECT of names, numbers,
//! parameters and comparison operators, such as `SELECT abalance FROM pgbench_accounts WHERE aid
//! = $1;`, one plain INSERT, UPDATE or DELETE (see [`plain_write`]), such as pgbench's
//! `UPDATE pgbench_tellers SET tbalance = tbalance + -3 WHERE tid = 7;`, and a lone `BEGIN`,
//! `COMMIT` or `ROLLBACK` (see [`lone_tx_word`]).
//!
//! One pass over the bytes proves that the full lexer and statement machine would find nothing
//! to object to: no parenthesis (so no function call, subquery or CTE body), no comment, literal,
//! quoted identifier or dollar quote (so no hint and no hidden `;`), no byte outside ASCII, at
//! most one `;` and only at the end, and none of the words that make a SELECT write or lock
//! (`FOR`, `INTO`, `INSERT`, `UPDATE`, `DELETE`, `MERGE`). Anything else returns `None` and
//! takes the full path; the answer, when there is one, is the full path's (see the proptest in
//! `tests.rs`).

use super::lexer::is_space;
use super::{Classification, Reason, TxControl};

/// Bytes of a word (`scan.l`'s ident_cont, ASCII only), digits and `$` included.
const WORD: u8 = 1;
/// Whitespace.
const SPACE: u8 = 2;
/// Single-byte operators and punctuation that start nothing longer: `= < > , . *`.
const PUNCT: u8 = 4;

const fn build_classes() -> [u8; 256] {
    let mut classes = [0u8; 256];
    let mut b = 0;
    while b < 128 {
        let byte = b as u8;
        if byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'$' {
            classes[b] = WORD;
        }
        if matches!(byte, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c) {
            classes[b] = SPACE;
        }
        if matches!(byte, b'=' | b'<' | b'>' | b',' | b'.' | b'*') {
            classes[b] = PUNCT;
        }
        b += 1;
    }
    classes
}

static CLASSES: [u8; 256] = build_classes();

/// The classification of a plain SELECT when `sql` is one; `None` when it needs the full path.
pub(super) fn plain_select(sql: &[u8]) -> Option<Classification> {
    let start = sql.iter().position(|&b| !is_space(b))?;
    let text = &sql[start..];
    if !text.get(..6)?.eq_ignore_ascii_case(b"select") {
        return None;
    }
    // One pass; a word is checked as a whole once its last byte is found.
    let n = text.len();
    let mut pos = 6;
    while pos < n {
        let class = CLASSES[usize::from(text[pos])];
        if class == WORD {
            let from = pos;
            pos += 1;
            while pos < n && CLASSES[usize::from(text[pos])] == WORD {
                pos += 1;
            }
            // A word glued to `select` is part of it: no longer SELECT.
            if from == 6 || !plain_word(&text[from..pos]) {
                return None;
            }
            continue;
        }
        if class == 0 {
            // Only a final `;` may follow (the string holds one statement).
            let last = text[pos] == b';' && text[pos + 1..].iter().all(|&b| is_space(b));
            return last.then_some(READ);
        }
        pos += 1;
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
    let head = text.get(..6)?;
    let insert = head.eq_ignore_ascii_case(b"insert");
    if !(insert || head.eq_ignore_ascii_case(b"update") || head.eq_ignore_ascii_case(b"delete")) {
        return None;
    }
    // Where the name of `INSERT INTO [schema.]table` ends: a `(` there opens the column list.
    let table_end = if insert { insert_table_end(text) } else { None };
    let n = text.len();
    let mut pos = 6;
    // As the full path counts them: a `)` too many is forgotten.
    let mut depth = 0u32;
    // The word the last token was, if it was one: a `(` after it may make a call of it.
    let mut last_word = None;
    while pos < n {
        let byte = text[pos];
        let class = CLASSES[usize::from(byte)];
        if class == WORD {
            let from = pos;
            pos += 1;
            while pos < n && CLASSES[usize::from(text[pos])] == WORD {
                pos += 1;
            }
            if from == 6 || !number_or_name(&text[from..pos]) {
                return None;
            }
            last_word = Some(from..pos);
            continue;
        }
        match byte {
            b'(' => {
                if let Some(word) = last_word.take() {
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
            _ if class != 0 => {}
            b';' if text[pos + 1..].iter().all(|&b| is_space(b)) => break,
            _ => return None,
        }
        if class != SPACE {
            last_word = None;
        }
        pos += 1;
    }
    (depth == 0).then_some(Classification::ONE_WRITE)
}

/// Where the table name ends in `text`, which starts with `INSERT`, when `INTO [schema.]table`
/// follows it (words of the fast path's alphabet, no space around the dot).
fn insert_table_end(text: &[u8]) -> Option<usize> {
    let word_end = |from: usize| {
        from + text[from..]
            .iter()
            .take_while(|&&b| CLASSES[usize::from(b)] == WORD)
            .count()
    };
    let skip_space = |from: usize| {
        from + text[from..]
            .iter()
            .take_while(|&&b| CLASSES[usize::from(b)] == SPACE)
            .count()
    };
    let into = skip_space(6);
    let into_end = word_end(into);
    if into == 6 || !text[into..into_end].eq_ignore_ascii_case(b"into") {
        return None;
    }
    let table = skip_space(into_end);
    let mut end = word_end(table);
    if table == into_end || end == table {
        return None;
    }
    if text.get(end) == Some(&b'.') && word_end(end + 1) > end + 1 {
        end = word_end(end + 1);
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

/// Whether a run of word bytes lexes as the fast path assumes and names nothing that matters.
fn plain_word(word: &[u8]) -> bool {
    match word {
        [b'0'..=b'9', ..] | [b'$', ..] => number_or_name(word),
        // Only words of three to six bytes whose first letter starts one of them are folded.
        [first, _, _] | [first, _, _, _] | [first, _, _, _, _] | [first, _, _, _, _, _]
            if matches!(first | 0x20, b'f' | b'i' | b'u' | b'd' | b'm') =>
        {
            !BLOCKING.contains(&folded(word))
        }
        _ => true,
    }
}

/// Whether a run of word bytes lexes as one token: a number or a parameter (`$1`) is digits
/// only (`1into` lexes as `1` and `into`, `$a$` opens a dollar quote); a name is anything else.
fn number_or_name(word: &[u8]) -> bool {
    match word {
        [b'0'..=b'9', digits @ ..] => digits.iter().all(u8::is_ascii_digit),
        [b'$', digits @ ..] => !digits.is_empty() && digits.iter().all(u8::is_ascii_digit),
        _ => true,
    }
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
