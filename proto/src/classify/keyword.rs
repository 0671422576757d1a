//! The handful of keywords the classifier reacts to.

use super::wordtable::WordTable;

/// A keyword that matters to classification; every other word is [`Kw::Other`].
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Kw {
    Abort,
    All,
    Analyze,
    As,
    Atomic,
    Begin,
    Call,
    Case,
    Characteristics,
    Commit,
    Constraints,
    Copy,
    Create,
    Declare,
    DefaultTransactionReadOnly,
    Delete,
    Discard,
    Do,
    End,
    Explain,
    False,
    For,
    From,
    Hold,
    Insert,
    Into,
    Key,
    Listen,
    Load,
    Local,
    Materialized,
    Merge,
    No,
    Not,
    On,
    Only,
    Prepare,
    Prepared,
    Read,
    Recursive,
    Release,
    Reset,
    Rollback,
    Savepoint,
    Select,
    Serializable,
    Session,
    Set,
    Share,
    Show,
    Start,
    Stdout,
    Table,
    Temp,
    To,
    Transaction,
    True,
    Update,
    Values,
    Verbose,
    With,
    Write,
    /// A grammar word that may stand before `(` without being a function name (`IN (`,
    /// `EXISTS (`, `OVER (`, `FILTER (`, ...).
    Syntax,
    /// Any other word: an identifier, or a keyword that does not matter here.
    Other,
}

/// Every word the classifier reacts to, in lower case.
const KEYWORDS: &[(&[u8], Kw)] = &[
    (b"abort", Kw::Abort),
    (b"all", Kw::All),
    (b"analyse", Kw::Analyze),
    (b"analyze", Kw::Analyze),
    (b"and", Kw::Syntax),
    (b"any", Kw::Syntax),
    (b"array", Kw::Syntax),
    (b"as", Kw::As),
    (b"asymmetric", Kw::Syntax),
    (b"atomic", Kw::Atomic),
    (b"begin", Kw::Begin),
    (b"between", Kw::Syntax),
    (b"by", Kw::Syntax),
    (b"call", Kw::Call),
    (b"case", Kw::Case),
    (b"cast", Kw::Syntax),
    (b"characteristics", Kw::Characteristics),
    (b"commit", Kw::Commit),
    (b"constraints", Kw::Constraints),
    (b"copy", Kw::Copy),
    (b"create", Kw::Create),
    (b"cube", Kw::Syntax),
    (b"declare", Kw::Declare),
    (
        b"default_transaction_read_only",
        Kw::DefaultTransactionReadOnly,
    ),
    (b"delete", Kw::Delete),
    (b"discard", Kw::Discard),
    (b"distinct", Kw::Syntax),
    (b"do", Kw::Do),
    (b"else", Kw::Syntax),
    (b"end", Kw::End),
    (b"escape", Kw::Syntax),
    (b"except", Kw::Syntax),
    (b"exists", Kw::Syntax),
    (b"explain", Kw::Explain),
    (b"false", Kw::False),
    (b"filter", Kw::Syntax),
    (b"first", Kw::Syntax),
    (b"for", Kw::For),
    (b"from", Kw::From),
    (b"group", Kw::Syntax),
    (b"having", Kw::Syntax),
    (b"hold", Kw::Hold),
    (b"ilike", Kw::Syntax),
    (b"in", Kw::Syntax),
    (b"insert", Kw::Insert),
    (b"intersect", Kw::Syntax),
    (b"into", Kw::Into),
    (b"is", Kw::Syntax),
    (b"join", Kw::Syntax),
    (b"key", Kw::Key),
    (b"lateral", Kw::Syntax),
    (b"like", Kw::Syntax),
    (b"limit", Kw::Syntax),
    (b"listen", Kw::Listen),
    (b"load", Kw::Load),
    (b"local", Kw::Local),
    (b"materialized", Kw::Materialized),
    (b"merge", Kw::Merge),
    (b"next", Kw::Syntax),
    (b"no", Kw::No),
    (b"not", Kw::Not),
    (b"off", Kw::False),
    (b"offset", Kw::Syntax),
    (b"on", Kw::On),
    (b"only", Kw::Only),
    (b"operator", Kw::Syntax),
    (b"or", Kw::Syntax),
    (b"order", Kw::Syntax),
    (b"ordinality", Kw::Syntax),
    (b"over", Kw::Syntax),
    (b"overlaps", Kw::Syntax),
    (b"partition", Kw::Syntax),
    (b"prepare", Kw::Prepare),
    (b"prepared", Kw::Prepared),
    (b"read", Kw::Read),
    (b"recursive", Kw::Recursive),
    (b"release", Kw::Release),
    (b"repeatable", Kw::Syntax),
    (b"reset", Kw::Reset),
    (b"returning", Kw::Syntax),
    (b"rollback", Kw::Rollback),
    (b"rollup", Kw::Syntax),
    (b"row", Kw::Syntax),
    (b"rows", Kw::Syntax),
    (b"savepoint", Kw::Savepoint),
    (b"select", Kw::Select),
    (b"serializable", Kw::Serializable),
    (b"session", Kw::Session),
    (b"set", Kw::Set),
    (b"sets", Kw::Syntax),
    (b"share", Kw::Share),
    (b"show", Kw::Show),
    (b"similar", Kw::Syntax),
    (b"some", Kw::Syntax),
    (b"start", Kw::Start),
    (b"stdout", Kw::Stdout),
    (b"symmetric", Kw::Syntax),
    (b"table", Kw::Table),
    (b"tablesample", Kw::Syntax),
    (b"temp", Kw::Temp),
    (b"temporary", Kw::Temp),
    (b"then", Kw::Syntax),
    (b"to", Kw::To),
    (b"transaction", Kw::Transaction),
    (b"true", Kw::True),
    (b"union", Kw::Syntax),
    (b"update", Kw::Update),
    (b"using", Kw::Syntax),
    (b"values", Kw::Values),
    (b"verbose", Kw::Verbose),
    (b"when", Kw::Syntax),
    (b"where", Kw::Syntax),
    (b"window", Kw::Syntax),
    (b"with", Kw::With),
    (b"write", Kw::Write),
    (b"yes", Kw::True),
    (b"zone", Kw::Syntax),
];

/// The longest word worth looking up (`default_transaction_read_only`).
const MAX_KEYWORD: usize = 29;

static TABLE: WordTable<Kw, 512> = WordTable::empty().with_pairs(KEYWORDS);

/// The keyword an unquoted word spells, ignoring ASCII case.
pub(super) fn keyword(word: &[u8]) -> Kw {
    if word.len() < 2 || word.len() > MAX_KEYWORD {
        return Kw::Other;
    }
    TABLE.get(word).unwrap_or(Kw::Other)
}

impl Kw {
    /// Whether `word (` is grammar rather than a function call when the word is this keyword.
    pub(super) fn opens_syntax(self) -> bool {
        matches!(
            self,
            Kw::Syntax
                | Kw::All
                | Kw::As
                | Kw::Case
                | Kw::Copy
                | Kw::Create
                | Kw::Delete
                | Kw::Explain
                | Kw::For
                | Kw::From
                | Kw::Insert
                | Kw::Into
                | Kw::Materialized
                | Kw::Merge
                | Kw::Not
                | Kw::On
                | Kw::Only
                | Kw::Recursive
                | Kw::Select
                | Kw::Set
                | Kw::Table
                | Kw::To
                | Kw::Update
                | Kw::Values
                | Kw::With
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_listed_keyword_is_found() {
        assert!(KEYWORDS.len() * 4 <= 512, "keep the table sparse");
        for &(word, kw) in KEYWORDS {
            assert_eq!(keyword(word), kw, "{}", String::from_utf8_lossy(word));
            assert!(word.len() <= MAX_KEYWORD);
        }
    }

    #[test]
    fn keywords_ignore_case_and_long_words_are_plain() {
        assert_eq!(keyword(b"SeLeCt"), Kw::Select);
        assert_eq!(keyword(b"ANALYSE"), Kw::Analyze);
        assert_eq!(
            keyword(b"DEFAULT_TRANSACTION_READ_ONLY"),
            Kw::DefaultTransactionReadOnly
        );
        assert_eq!(
            keyword(b"a_very_long_identifier_name_that_is_no_keyword"),
            Kw::Other
        );
        assert_eq!(keyword(b"selec"), Kw::Other);
        assert_eq!(keyword(b"\xc3\xa9"), Kw::Other);
    }
}
