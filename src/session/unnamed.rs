//! Transaction pooling: the record of a session's unnamed statement, kept so that it can be
//! prepared again on another connection, and the spare records each data-plane thread keeps.

use pgvigil_proto::classify::Classification;

use super::spare::Spares;
use crate::statements::StatementId;

/// The longest Parse of the unnamed statement a session keeps to prepare again on another
/// connection under transaction pooling. Every idle session keeps its last one, so a bound
/// keeps an idle client cheap; a session whose unnamed statement is longer keeps its connection
/// instead until it replaces that statement (see
/// [`super::replay::Replayable::holds_connection`]).
pub const UNNAMED_KEPT_MAX: usize = 16 * 1024;

/// Transaction pooling: the session's unnamed statement. Directly on PostgreSQL it lives until
/// the next Parse of the unnamed statement or simple Query, across transactions; pgvigil
/// prepares it again on a connection that lacks it before a unit that binds it.
#[derive(Debug, Clone)]
pub struct OwnUnnamed {
    /// What marks it on the connections that have it (see `ServerStatements::unnamed_of`).
    pub id: StatementId,
    /// The client's Parse message, whole, when `kept`.
    parse: Vec<u8>,
    /// Whether the Parse was short enough to keep (at most [`UNNAMED_KEPT_MAX`] bytes).
    kept: bool,
    /// What its text is (`None`: not classified, judged a write).
    pub class: Option<Classification>,
}

/// Records whose copy has more room than this are freed rather than kept: a spare becomes an
/// idle session's record.
const SPARE_RECORD_ROOM: usize = 512;

thread_local! {
    /// Records kept for the next unnamed Parse: under transaction pooling a client that parses
    /// the unnamed statement in every unit (the extended protocol's usual way) would otherwise
    /// allocate and free a record and its copy at every unit.
    static SPARE: Spares<Box<OwnUnnamed>> = const { Spares::new() };
}

impl OwnUnnamed {
    /// The client's Parse `frame` of the unnamed statement, to be known as `id`.
    pub fn new(id: StatementId, frame: &[u8]) -> Box<OwnUnnamed> {
        let kept = frame.len() <= UNNAMED_KEPT_MAX;
        let spare = SPARE.with(Spares::take);
        let mut own = spare.unwrap_or_else(|| {
            Box::new(OwnUnnamed {
                id,
                parse: Vec::new(),
                kept,
                class: None,
            })
        });
        own.id = id;
        own.kept = kept;
        own.class = None;
        own.parse.clear();
        if kept {
            own.parse.extend_from_slice(frame);
        }
        own
    }

    /// The client's Parse message, whole; `None` when it was too long to keep.
    pub fn parse(&self) -> Option<&[u8]> {
        self.kept.then_some(self.parse.as_slice())
    }

    /// Gives up a record: kept for the next unnamed Parse on this thread when there is room.
    pub fn recycle(own: Box<OwnUnnamed>) {
        if own.parse.capacity() <= SPARE_RECORD_ROOM {
            SPARE.with(|spare| spare.give(own));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unnamed_statements_record_is_reused_on_its_thread_unless_it_grew_large() {
        let first = OwnUnnamed::new(1, b"P-short");
        let at: *const OwnUnnamed = &*first;
        OwnUnnamed::recycle(first);
        let again = OwnUnnamed::new(2, b"P-other");
        assert_eq!(
            &*again as *const OwnUnnamed, at,
            "the record was not reused"
        );
        assert_eq!((again.id, again.parse()), (2, Some(b"P-other".as_slice())));
        let long = vec![b'x'; UNNAMED_KEPT_MAX + 1];
        let too_long = OwnUnnamed::new(3, &long);
        assert_eq!(too_long.parse(), None);
        let large = OwnUnnamed::new(4, &[b'y'; SPARE_RECORD_ROOM + 1]);
        let spares = SPARE.with(Spares::len);
        OwnUnnamed::recycle(large);
        assert_eq!(SPARE.with(Spares::len), spares, "a large record was kept");
    }
}
