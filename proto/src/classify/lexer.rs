//! A byte-level SQL tokenizer that follows the boundaries of PostgreSQL's scanner (`scan.l`).
//!
//! It only has to find where comments, literals, identifiers and punctuation begin and end, so
//! that a `;` or a keyword inside a string never counts. It works on bytes: every byte >= 0x80 is
//! an identifier character, as in `scan.l`, which is right for every server-safe encoding.

/// One token; words and quoted identifiers borrow their text from the statement.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Tok<'a> {
    /// An unquoted identifier or keyword (may contain `$` after the first byte).
    Word(&'a [u8]),
    /// A `"quoted identifier"`: the bytes between the quotes, `""` left doubled.
    Quoted(&'a [u8]),
    /// A string constant of any kind; `body` is what lies between the delimiters.
    Str {
        /// The raw bytes between the quotes (or dollar tags).
        body: &'a [u8],
        /// A plain `'...'` string holding a backslash: where it ends depends on the session's
        /// `standard_conforming_strings`, which this lexer cannot see.
        ambiguous: bool,
    },
    /// A numeric constant (digits only up to the first letter: `1into` is `1`, `into`).
    Num(&'a [u8]),
    /// A positional parameter such as `$1`.
    Param,
    /// `(`
    LParen,
    /// `)`
    RParen,
    /// `;`
    Semi,
    /// `,`
    Comma,
    /// `.`
    Dot,
    /// Any other single byte: operator characters, brackets, `:`.
    Op(u8),
    /// The text ended inside a comment, a string or a quoted identifier; the server rejects it.
    /// The lexer is at the end afterwards.
    Unterminated,
}

/// The lexer's internal error, surfaced as [`Tok::Unterminated`].
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Unterminated;

/// Iterates over the tokens of a SQL text, skipping whitespace and comments.
pub(super) struct Lexer<'a> {
    sql: &'a [u8],
    pos: usize,
}

/// Byte classes of `scan.l`, looked up in one table load per byte.
const IDENT_START: u8 = 1;
const IDENT_CONT: u8 = 2;
const SPACE: u8 = 4;

const fn build_classes() -> [u8; 256] {
    let mut classes = [0u8; 256];
    let mut b = 0;
    while b < 256 {
        let byte = b as u8;
        // ident_start [A-Za-z\200-\377_]; ident_cont adds [0-9$]; space [ \t\n\r\f\v].
        if byte.is_ascii_alphabetic() || byte == b'_' || byte >= 0x80 {
            classes[b] |= IDENT_START | IDENT_CONT;
        }
        if byte.is_ascii_digit() || byte == b'$' {
            classes[b] |= IDENT_CONT;
        }
        if matches!(byte, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c) {
            classes[b] |= SPACE;
        }
        b += 1;
    }
    classes
}

static CLASSES: [u8; 256] = build_classes();

/// `ident_start` of `scan.l`.
fn ident_start(b: u8) -> bool {
    CLASSES[usize::from(b)] & IDENT_START != 0
}

/// `ident_cont` of `scan.l`.
fn ident_cont(b: u8) -> bool {
    CLASSES[usize::from(b)] & IDENT_CONT != 0
}

/// `space` of `scan.l`.
pub(super) fn is_space(b: u8) -> bool {
    CLASSES[usize::from(b)] & SPACE != 0
}

impl<'a> Lexer<'a> {
    /// A lexer at the start of `sql`.
    pub(super) fn new(sql: &'a [u8]) -> Lexer<'a> {
        Lexer { sql, pos: 0 }
    }

    fn at(&self, i: usize) -> u8 {
        self.sql.get(i).copied().unwrap_or(0)
    }

    /// The next token, or `None` at the end.
    ///
    /// Returning a plain `Option<Tok>` (not a `Result`) keeps one layout from here to the
    /// statement machine: re-packing a `Result` cost a store-forwarding stall per token.
    pub(super) fn next_token(&mut self) -> Option<Tok<'a>> {
        if self.skip_trivia().is_err() {
            self.pos = self.sql.len();
            return Some(Tok::Unterminated);
        }
        let start = self.pos;
        let b = *self.sql.get(start)?;
        let tok = match b {
            b'(' => self.single(Tok::LParen),
            b')' => self.single(Tok::RParen),
            b';' => self.single(Tok::Semi),
            b',' => self.single(Tok::Comma),
            b'\'' => self.standard_string(start + 1),
            b'"' => self.quoted_identifier(),
            b'$' => self.dollar(),
            b'0'..=b'9' => Ok(self.number()),
            b'.' if self.at(start + 1).is_ascii_digit() => Ok(self.number()),
            b'.' => self.single(Tok::Dot),
            _ if ident_start(b) => self.word(),
            _ => self.single(Tok::Op(b)),
        };
        match tok {
            Ok(tok) => Some(tok),
            Err(Unterminated) => {
                self.pos = self.sql.len();
                Some(Tok::Unterminated)
            }
        }
    }

    fn single(&mut self, tok: Tok<'a>) -> Result<Tok<'a>, Unterminated> {
        self.pos += 1;
        Ok(tok)
    }

    /// Skips whitespace, `--` line comments and nested `/* */` block comments.
    fn skip_trivia(&mut self) -> Result<(), Unterminated> {
        loop {
            let rest = self.sql.get(self.pos..).unwrap_or_default();
            self.pos += rest
                .iter()
                .position(|&b| !is_space(b))
                .unwrap_or(rest.len());
            match (self.at(self.pos), self.at(self.pos + 1)) {
                (b'-', b'-') => self.pos = line_comment_end(self.sql, self.pos),
                (b'/', b'*') => {
                    self.pos = block_comment_end(self.sql, self.pos).ok_or(Unterminated)?
                }
                _ => return Ok(()),
            }
        }
    }

    /// An identifier or keyword; `E'` and `U&'` prefixes start special strings.
    fn word(&mut self) -> Result<Tok<'a>, Unterminated> {
        let start = self.pos;
        let rest = self.sql.get(start + 1..).unwrap_or_default();
        let end = start
            + 1
            + rest
                .iter()
                .position(|&b| !ident_cont(b))
                .unwrap_or(rest.len());
        if end == start + 1 {
            let first = self.at(start);
            if matches!(first, b'e' | b'E') && self.at(end) == b'\'' {
                return self.escape_string(end + 1);
            }
            // U&'...' is never backslash-escaped, whatever standard_conforming_strings says.
            if matches!(first, b'u' | b'U') && self.at(end) == b'&' && self.at(end + 1) == b'\'' {
                return self.standard_string(end + 2).map(|tok| match tok {
                    Tok::Str { body, .. } => Tok::Str {
                        body,
                        ambiguous: false,
                    },
                    other => other,
                });
            }
        }
        self.pos = end;
        Ok(Tok::Word(&self.sql[start..end]))
    }

    /// `'...'` with `''` doubling; `body_start` is just past the opening quote.
    fn standard_string(&mut self, body_start: usize) -> Result<Tok<'a>, Unterminated> {
        let mut i = body_start;
        let mut ambiguous = false;
        loop {
            match self.sql.get(i) {
                None => return Err(Unterminated),
                Some(b'\'') if self.at(i + 1) == b'\'' => i += 2,
                Some(b'\'') => break,
                Some(b'\\') => {
                    ambiguous = true;
                    i += 1;
                }
                Some(_) => i += 1,
            }
        }
        self.pos = i + 1;
        Ok(Tok::Str {
            body: &self.sql[body_start..i],
            ambiguous,
        })
    }

    /// `E'...'`: a backslash escapes the next byte, `''` is a quote.
    fn escape_string(&mut self, body_start: usize) -> Result<Tok<'a>, Unterminated> {
        let mut i = body_start;
        loop {
            match self.sql.get(i) {
                None => return Err(Unterminated),
                Some(b'\\') => i += 2,
                Some(b'\'') if self.at(i + 1) == b'\'' => i += 2,
                Some(b'\'') => break,
                Some(_) => i += 1,
            }
        }
        self.pos = i + 1;
        Ok(Tok::Str {
            body: &self.sql[body_start..i],
            ambiguous: false,
        })
    }

    /// `"..."` with `""` doubling.
    fn quoted_identifier(&mut self) -> Result<Tok<'a>, Unterminated> {
        let start = self.pos + 1;
        let mut i = start;
        loop {
            match self.sql.get(i) {
                None => return Err(Unterminated),
                Some(b'"') if self.at(i + 1) == b'"' => i += 2,
                Some(b'"') => break,
                Some(_) => i += 1,
            }
        }
        self.pos = i + 1;
        Ok(Tok::Quoted(&self.sql[start..i]))
    }

    /// `$1` (a parameter), `$tag$...$tag$` or `$$...$$` (a string), or a lone `$`.
    fn dollar(&mut self) -> Result<Tok<'a>, Unterminated> {
        let start = self.pos;
        if self.at(start + 1).is_ascii_digit() {
            let mut i = start + 1;
            while self.at(i).is_ascii_digit() {
                i += 1;
            }
            self.pos = i;
            return Ok(Tok::Param);
        }
        // dolq_start is ident_start; dolq_cont is ident_cont without `$`.
        let mut i = start + 1;
        if ident_start(self.at(i)) {
            while i < self.sql.len() && ident_cont(self.at(i)) && self.at(i) != b'$' {
                i += 1;
            }
        }
        if self.at(i) != b'$' {
            return self.single(Tok::Op(b'$'));
        }
        let tag = &self.sql[start..=i];
        let body_start = i + 1;
        let close =
            find(self.sql.get(body_start..).unwrap_or_default(), tag).ok_or(Unterminated)?;
        self.pos = body_start + close + tag.len();
        Ok(Tok::Str {
            body: &self.sql[body_start..body_start + close],
            ambiguous: false,
        })
    }

    /// Digits, an optional fraction and an optional exponent; a following letter starts a new
    /// token, so `SELECT 1into t` shows its `into` (servers before 15 accept that spelling).
    fn number(&mut self) -> Tok<'a> {
        let start = self.pos;
        let mut i = start;
        while self.at(i).is_ascii_digit() {
            i += 1;
        }
        if self.at(i) == b'.' && self.at(i + 1) != b'.' {
            i += 1;
            while self.at(i).is_ascii_digit() {
                i += 1;
            }
        }
        if matches!(self.at(i), b'e' | b'E') {
            let sign = usize::from(matches!(self.at(i + 1), b'+' | b'-'));
            if self.at(i + 1 + sign).is_ascii_digit() {
                i += 1 + sign;
                while self.at(i).is_ascii_digit() {
                    i += 1;
                }
            }
        }
        self.pos = i;
        Tok::Num(&self.sql[start..i])
    }
}

/// The index just past a `--` comment starting at `start` (its newline is whitespace).
fn line_comment_end(sql: &[u8], start: usize) -> usize {
    let mut i = start + 2;
    while i < sql.len() && !matches!(sql[i], b'\n' | b'\r') {
        i += 1;
    }
    i
}

/// The index just past the nested block comment starting at `start`, or `None` if it never ends.
pub(super) fn block_comment_end(sql: &[u8], start: usize) -> Option<usize> {
    let mut depth = 0usize;
    let mut i = start;
    while i + 1 < sql.len() {
        match (sql[i], sql[i + 1]) {
            (b'/', b'*') => {
                depth += 1;
                i += 2;
            }
            (b'*', b'/') => {
                depth -= 1;
                i += 2;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => i += 1,
        }
    }
    None
}

/// The first index of `needle` in `haystack`.
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(sql: &str) -> Vec<Tok<'_>> {
        let mut lexer = Lexer::new(sql.as_bytes());
        std::iter::from_fn(|| lexer.next_token()).collect()
    }

    #[test]
    fn strings_comments_and_identifiers_hide_their_contents() {
        let toks = tokens("SELECT 'a;b', E'\\';', $x$;$x$, \"a\"\"b\" /* /* ; */ */ -- ;\n;");
        assert_eq!(
            toks,
            vec![
                Tok::Word(b"SELECT"),
                Tok::Str {
                    body: b"a;b",
                    ambiguous: false
                },
                Tok::Comma,
                Tok::Str {
                    body: b"\\';",
                    ambiguous: false
                },
                Tok::Comma,
                Tok::Str {
                    body: b";",
                    ambiguous: false
                },
                Tok::Comma,
                Tok::Quoted(b"a\"\"b"),
                Tok::Semi,
            ]
        );
    }

    #[test]
    fn parameters_are_not_dollar_quotes() {
        assert_eq!(
            tokens("$1,$$a$$,a$b$"),
            vec![
                Tok::Param,
                Tok::Comma,
                Tok::Str {
                    body: b"a",
                    ambiguous: false
                },
                Tok::Comma,
                Tok::Word(b"a$b$"),
            ]
        );
    }

    #[test]
    fn numbers_stop_before_letters() {
        assert_eq!(
            tokens("1into 1.5e3 .5"),
            vec![
                Tok::Num(b"1"),
                Tok::Word(b"into"),
                Tok::Num(b"1.5e3"),
                Tok::Num(b".5"),
            ]
        );
    }

    #[test]
    fn unterminated_constructs_end_the_stream() {
        for sql in ["'abc", "E'\\'", "\"abc", "$a$ b", "/* /* */", "U&'x"] {
            assert_eq!(tokens(sql).last(), Some(&Tok::Unterminated), "{sql}");
        }
    }

    #[test]
    fn backslash_in_plain_string_is_ambiguous_but_not_in_unicode_strings() {
        assert_eq!(
            tokens("'a\\' U&'\\0041'"),
            vec![
                Tok::Str {
                    body: b"a\\",
                    ambiguous: true
                },
                Tok::Str {
                    body: b"\\0041",
                    ambiguous: false
                },
            ]
        );
    }
}
