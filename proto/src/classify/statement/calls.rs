//! Function calls inside a statement: which `name(` is a call, and what it does to the verdict.

use super::{InsertTarget, Kind, Seen, Statement};
use crate::classify::functions::{is_session_lock, CallKind, FunctionLists, Ident};
use crate::classify::keyword::Kw;
use crate::classify::lexer::Tok;
use crate::classify::{Pin, Reason};

/// A call whose verdict waits: `x(a, b)` after WITH or a comma may be a CTE's column list.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) struct Pending {
    pub(super) kind: CallKind,
    step: PendingStep,
}

/// How far `name(ident, ...) AS (` has got.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum PendingStep {
    Inside,
    Closed,
    ClosedAs,
}

impl<'a> Statement<'a> {
    /// At `(`: if the tokens before it name a function, judge the call.
    pub(super) fn call(&mut self, lists: &FunctionLists) {
        let Some(name) = ident(self.hist[0]) else {
            return;
        };
        if name.is(b"set_config") {
            // In any schema and any statement: the session reads its arguments (see
            // `Classification::set_config`).
            self.set_config = true;
        }
        let qualified = self.hist[1].0 == Tok::Dot;
        let qualifier = if qualified { ident(self.hist[2]) } else { None };
        if matches!(self.kind, Kind::Other | Kind::Create { .. }) {
            // Neither a query nor INSERT, UPDATE, DELETE or MERGE (DDL, say, where `name(` is as
            // often a column or parameter list as a call): it writes anyway, and only an
            // advisory lock's pin still counts.
            if is_session_lock(qualifier, name) {
                self.pin(Pin::AdvisoryLock);
            }
            return;
        }
        if qualified && qualifier.is_none() {
            // `(expr).name(`: not a plain schema-qualified name, so not a name we know.
            self.apply_call(CallKind::Unknown);
            return;
        }
        let before = self.hist[1];
        if !qualified && before.1 == Kw::As {
            // `AS alias(col, ...)`: a column alias list, or a type modifier after CAST's AS.
            return;
        }
        if self.target == InsertTarget::Named {
            // `INSERT INTO name (col, ...)`: the column list.
            return;
        }
        if before.1 == Kw::On && !name.quoted && name.is(b"conflict") && self.body_write.is_some() {
            // `INSERT ... ON CONFLICT (col, ...)`: the conflict target. (In a statement that
            // writes anyway: in a read, such a call still keeps the statement off a replica.)
            return;
        }
        let kind = lists.call_kind(qualifier, name);
        if kind == CallKind::Read {
            return;
        }
        let maybe_cte = matches!(before.1, Kw::With | Kw::Recursive) || before.0 == Tok::Comma;
        if !qualified && maybe_cte {
            self.pending = Some(Pending {
                kind,
                step: PendingStep::Inside,
            });
        } else {
            self.apply_call(kind);
        }
    }

    pub(super) fn apply_call(&mut self, kind: CallKind) {
        match kind {
            CallKind::Read => {}
            CallKind::Write => self.mark(Reason::WriteFunction),
            CallKind::SessionLock => {
                self.mark(Reason::WriteFunction);
                self.pin(Pin::AdvisoryLock);
            }
            CallKind::Unknown => {
                self.mark(Reason::UnknownFunction);
                self.unknown_call = true;
            }
        }
    }

    /// Follows a pending call: `name(ident, ...) AS (` or `AS [NOT] MATERIALIZED` makes it a CTE
    /// column list; anything else makes it a call after all.
    pub(super) fn advance_pending(&mut self, tok: Tok<'a>, kw: Kw) {
        let Some(pending) = self.pending.as_mut() else {
            return;
        };
        let next = match (pending.step, tok) {
            (PendingStep::Inside, Tok::Word(_) | Tok::Quoted(_) | Tok::Comma) => {
                Some(PendingStep::Inside)
            }
            (PendingStep::Inside, Tok::RParen) => Some(PendingStep::Closed),
            (PendingStep::Closed, Tok::Word(_)) if kw == Kw::As => Some(PendingStep::ClosedAs),
            (PendingStep::ClosedAs, Tok::LParen) => {
                self.pending = None;
                return;
            }
            (PendingStep::ClosedAs, Tok::Word(_)) if matches!(kw, Kw::Not | Kw::Materialized) => {
                self.pending = None;
                return;
            }
            _ => None,
        };
        match next {
            Some(step) => pending.step = step,
            None => {
                let kind = pending.kind;
                self.pending = None;
                self.apply_call(kind);
            }
        }
    }
}

/// The name a token spells, if it can be a function or schema name.
fn ident<'a>((tok, kw): Seen<'a>) -> Option<Ident<'a>> {
    match tok {
        Tok::Word(text) if !kw.opens_syntax() => Some(Ident {
            text,
            quoted: false,
        }),
        Tok::Quoted(text) => Some(Ident { text, quoted: true }),
        _ => None,
    }
}
