//! Reading SQL text word by word without a parser: keywords, punctuation, string constants
//! and comments, as the settings log and the resetting statements need them.

/// `text` after leading whitespace and `expected` (ASCII case-insensitive).
pub(super) fn token<'a>(text: &'a [u8], expected: &[u8]) -> Option<&'a [u8]> {
    let text = text.trim_ascii_start();
    let head = text.get(..expected.len())?;
    head.eq_ignore_ascii_case(expected)
        .then(|| &text[expected.len()..])
}

/// Like [`token`], but a keyword must not run on into an identifier.
pub(super) fn word<'a>(text: &'a [u8], expected: &[u8]) -> Option<&'a [u8]> {
    let rest = token(text, expected)?;
    let runs_on = rest
        .first()
        .is_some_and(|b| b.is_ascii_alphanumeric() || *b == b'_')
        && expected.last().is_some_and(u8::is_ascii_alphanumeric);
    (!runs_on).then_some(rest)
}

/// `text` after leading whitespace and one standard string constant without backslashes.
pub(super) fn string(text: &[u8]) -> Option<&[u8]> {
    let text = token(text, b"'")?;
    let mut i = 0;
    loop {
        match text.get(i)? {
            b'\\' => return None,
            b'\'' if text.get(i + 1) == Some(&b'\'') => i += 2,
            b'\'' => return Some(&text[i + 1..]),
            _ => i += 1,
        }
    }
}

/// Whether `haystack` contains `needle`, ASCII case-insensitive. Only where the needle's first
/// byte occurs (found with SIMD) is the rest compared: this runs over the text of every read
/// (comparing every window cost about 1,400 instructions per pgbench UPDATE when it also ran over
/// every write).
pub(super) fn contains_ignore_case(haystack: &[u8], needle: &[u8]) -> bool {
    let Some((&first, rest)) = needle.split_first() else {
        return true;
    };
    let Some(last_start) = haystack.len().checked_sub(needle.len()) else {
        return false;
    };
    let candidates = &haystack[..=last_start];
    memchr::memchr2_iter(
        first.to_ascii_lowercase(),
        first.to_ascii_uppercase(),
        candidates,
    )
    .any(|i| haystack[i + 1..i + needle.len()].eq_ignore_ascii_case(rest))
}

/// `sql` after leading whitespace, `--` comments and `/* */` comments (not nested).
pub(super) fn skip_comments(mut sql: &[u8]) -> &[u8] {
    loop {
        sql = sql.trim_ascii_start();
        if let Some(rest) = sql.strip_prefix(b"--") {
            let end = rest.iter().position(|b| *b == b'\n').unwrap_or(rest.len());
            sql = &rest[end..];
        } else if let Some(rest) = sql.strip_prefix(b"/*") {
            let end = rest.windows(2).position(|w| w == b"*/");
            sql = end.map_or(&[], |end| &rest[end + 2..]);
        } else {
            return sql;
        }
    }
}
