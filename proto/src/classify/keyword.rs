//! The handful of keywords the classifier reacts to.

/// A keyword that matters to classification; every other word is [`Kw::Other`].
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Kw {
    Abort,
    All,
    Analyze,
    As,
    Atomic,
    Begin,
    Case,
    Characteristics,
    Commit,
    Constraints,
    Copy,
    Create,
    DefaultTransactionReadOnly,
    Delete,
    Discard,
    End,
    Explain,
    False,
    For,
    From,
    Insert,
    Into,
    Key,
    Listen,
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
    Unlisten,
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

/// The longest word worth looking up (`default_transaction_read_only`).
const MAX_KEYWORD: usize = 29;

/// The keyword an unquoted word spells, ignoring ASCII case.
pub(super) fn keyword(word: &[u8]) -> Kw {
    let mut buf = [0u8; MAX_KEYWORD];
    let Some(lower) = buf.get_mut(..word.len()) else {
        return Kw::Other;
    };
    lower.copy_from_slice(word);
    lower.make_ascii_lowercase();
    match &*lower {
        b"abort" => Kw::Abort,
        b"all" => Kw::All,
        b"analyze" | b"analyse" => Kw::Analyze,
        b"as" => Kw::As,
        b"atomic" => Kw::Atomic,
        b"begin" => Kw::Begin,
        b"case" => Kw::Case,
        b"characteristics" => Kw::Characteristics,
        b"commit" => Kw::Commit,
        b"constraints" => Kw::Constraints,
        b"copy" => Kw::Copy,
        b"create" => Kw::Create,
        b"default_transaction_read_only" => Kw::DefaultTransactionReadOnly,
        b"delete" => Kw::Delete,
        b"discard" => Kw::Discard,
        b"end" => Kw::End,
        b"explain" => Kw::Explain,
        b"false" | b"off" => Kw::False,
        b"for" => Kw::For,
        b"from" => Kw::From,
        b"insert" => Kw::Insert,
        b"into" => Kw::Into,
        b"key" => Kw::Key,
        b"listen" => Kw::Listen,
        b"local" => Kw::Local,
        b"materialized" => Kw::Materialized,
        b"merge" => Kw::Merge,
        b"no" => Kw::No,
        b"not" => Kw::Not,
        b"on" => Kw::On,
        b"only" => Kw::Only,
        b"prepare" => Kw::Prepare,
        b"prepared" => Kw::Prepared,
        b"read" => Kw::Read,
        b"recursive" => Kw::Recursive,
        b"release" => Kw::Release,
        b"reset" => Kw::Reset,
        b"rollback" => Kw::Rollback,
        b"savepoint" => Kw::Savepoint,
        b"select" => Kw::Select,
        b"serializable" => Kw::Serializable,
        b"session" => Kw::Session,
        b"set" => Kw::Set,
        b"share" => Kw::Share,
        b"show" => Kw::Show,
        b"start" => Kw::Start,
        b"stdout" => Kw::Stdout,
        b"table" => Kw::Table,
        b"temp" | b"temporary" => Kw::Temp,
        b"to" => Kw::To,
        b"transaction" => Kw::Transaction,
        b"true" | b"yes" => Kw::True,
        b"unlisten" => Kw::Unlisten,
        b"update" => Kw::Update,
        b"values" => Kw::Values,
        b"verbose" => Kw::Verbose,
        b"with" => Kw::With,
        b"write" => Kw::Write,
        b"and" | b"any" | b"array" | b"asymmetric" | b"between" | b"by" | b"cast" | b"cube"
        | b"distinct" | b"else" | b"escape" | b"except" | b"exists" | b"filter" | b"first"
        | b"group" | b"having" | b"ilike" | b"in" | b"intersect" | b"is" | b"join" | b"lateral"
        | b"like" | b"limit" | b"next" | b"offset" | b"operator" | b"or" | b"order"
        | b"ordinality" | b"over" | b"overlaps" | b"partition" | b"repeatable" | b"returning"
        | b"rollup" | b"row" | b"rows" | b"sets" | b"similar" | b"some" | b"symmetric"
        | b"tablesample" | b"then" | b"union" | b"using" | b"when" | b"where" | b"window"
        | b"zone" => Kw::Syntax,
        _ => Kw::Other,
    }
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
