//! One statement's state machine: fed token by token, it learns what the statement is.

mod calls;

use super::functions::FunctionLists;
use super::keyword::{keyword, Kw};
use super::lexer::Tok;
use super::{Classification, Hint, Pin, Reason, TxControl};
use calls::Pending;

/// What the statement is, as far as its leading words tell.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    /// No word yet (perhaps leading parentheses).
    Empty,
    /// SELECT, VALUES, TABLE or WITH: a read unless its body says otherwise.
    Query,
    /// SHOW: always a read.
    Show,
    /// After EXPLAIN (or its options): the next word starts the explained statement.
    ExplainPrefix {
        /// Whether `(` here opens an option list.
        first: bool,
    },
    /// Inside `EXPLAIN (...)`.
    ExplainOptions {
        /// The previous option was ANALYZE, whose value may follow.
        analyze_pending: bool,
    },
    /// COPY, at a given step.
    Copy(CopyStep),
    /// START, expecting TRANSACTION.
    StartTx,
    /// Transaction modes (READ ONLY, ISOLATION LEVEL ...) after one of three openings.
    TxModes {
        of: ModesOf,
        read_only: Option<bool>,
        serializable: bool,
    },
    /// COMMIT, ROLLBACK, SAVEPOINT, RELEASE and PREPARE TRANSACTION.
    TxEnd(TxControl),
    /// PREPARE: TRANSACTION or a statement name follows.
    Prepare,
    /// SET, before the variable name.
    Set,
    /// SET SESSION, before CHARACTERISTICS or the variable name.
    SetSession,
    /// SET of a session variable; `watch` while the value of default_transaction_read_only is due.
    SetVar { watch: bool },
    /// SET LOCAL: lasts only for the transaction.
    SetLocal,
    /// SET CONSTRAINTS: lasts only for the transaction.
    SetTransactionScoped,
    /// RESET.
    Reset,
    /// DISCARD.
    Discard,
    /// CREATE; `prefix` while only OR, REPLACE, GLOBAL or LOCAL followed it.
    Create { prefix: bool },
    /// DECLARE, before the FOR of its query: WITH HOLD may follow.
    Declare,
    /// INSERT, UPDATE, DELETE or MERGE: not a read, but its calls still count.
    Write,
    /// Anything else: not a read.
    Other,
}

/// Where `INSERT INTO name [AS alias] (columns)` has got: the column list is no call.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum InsertTarget {
    /// Not in an INSERT's target.
    None,
    /// After INTO (or a `.`): a name follows.
    Expected,
    /// After the name (or its alias): `(` opens the column list.
    Named,
    /// After the name's AS: the alias follows.
    Alias,
}

/// Which statement the transaction modes belong to.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum ModesOf {
    Begin,
    SetTransaction,
    SessionCharacteristics,
}

/// Where a COPY statement has got to.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum CopyStep {
    Start,
    TableName,
    Query,
    AfterQuery,
    To,
    ToStdout,
    Rejected,
}

/// Whether the statement is explained rather than run.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Explain {
    No,
    Plain,
    Analyze,
}

/// A token with its keyword, as remembered for context.
pub(super) type Seen<'a> = (Tok<'a>, Kw);

/// Nothing seen yet.
const NOTHING: Seen<'static> = (Tok::Semi, Kw::Other);

/// The state of the statement being read.
pub(super) struct Statement<'a> {
    kind: Kind,
    explain: Explain,
    tokens: u32,
    /// The last three tokens, most recent first.
    hist: [Seen<'a>; 3],
    depth: u32,
    /// Depth of `BEGIN ATOMIC ... END` bodies, inside which `;` does not end the statement.
    atomic: u32,
    body_write: Option<Reason>,
    failure: Option<Reason>,
    pin: Option<Pin>,
    pending: Option<Pending>,
    /// A call of a function on no list.
    unknown_call: bool,
    /// A call of `set_config`.
    set_config: bool,
    target: InsertTarget,
    session_read_only: Option<bool>,
}

impl<'a> Statement<'a> {
    /// A statement before its first token.
    pub(super) fn new() -> Statement<'a> {
        Statement {
            kind: Kind::Empty,
            explain: Explain::No,
            tokens: 0,
            hist: [NOTHING; 3],
            depth: 0,
            atomic: 0,
            body_write: None,
            failure: None,
            pin: None,
            pending: None,
            unknown_call: false,
            set_config: false,
            target: InsertTarget::None,
            session_read_only: None,
        }
    }

    /// Whether a `;` here ends the statement (as psql decides: not inside parentheses or a
    /// `BEGIN ATOMIC` body; the server rejects a string whose parentheses do not balance).
    pub(super) fn ends_at_semicolon(&self) -> bool {
        self.depth == 0 && self.atomic == 0
    }

    /// The text cannot be classified safely from here on.
    pub(super) fn fail(&mut self, reason: Reason) {
        self.failure.get_or_insert(reason);
    }

    /// Reads one token.
    pub(super) fn feed(&mut self, tok: Tok<'a>, lists: &FunctionLists) {
        let kw = match tok {
            // Once a statement is known to write, keywords no longer change anything that
            // matters (calls still count for pins): skip the lookups.
            Tok::Word(word) if self.kind != Kind::Other => keyword(word),
            _ => Kw::Other,
        };
        self.tokens = self.tokens.saturating_add(1);
        if let Tok::Str {
            ambiguous: true, ..
        } = tok
        {
            self.fail(Reason::AmbiguousBackslash);
        }
        self.advance_pending(tok, kw);
        match tok {
            Tok::LParen => self.depth = self.depth.saturating_add(1),
            Tok::RParen => self.depth = self.depth.saturating_sub(1),
            _ => {}
        }
        if self.scans_body() {
            self.scan_body(tok, kw, lists);
        }
        self.target = self.next_target(tok, kw);
        self.step(tok, kw);
        self.hist = [(tok, kw), self.hist[0], self.hist[1]];
    }

    /// Whether the tokens are SQL whose calls and keywords count (not COPY's table name and
    /// options, not EXPLAIN's options).
    fn scans_body(&self) -> bool {
        match self.kind {
            Kind::Copy(step) => step == CopyStep::Query,
            Kind::ExplainPrefix { .. } | Kind::ExplainOptions { .. } => false,
            _ => true,
        }
    }

    /// Records a reason the body is not a pure read (the first one wins).
    fn mark(&mut self, reason: Reason) {
        self.body_write.get_or_insert(reason);
    }

    fn pin(&mut self, pin: Pin) {
        self.pin.get_or_insert(pin);
    }

    /// Keywords and calls that make a query write, wherever they appear in it.
    fn scan_body(&mut self, tok: Tok<'a>, kw: Kw, lists: &FunctionLists) {
        let prev = self.hist[0].1;
        match (tok, kw) {
            (Tok::Word(_), Kw::Share | Kw::No | Kw::Key | Kw::Update) if prev == Kw::For => {
                self.mark(Reason::RowLock)
            }
            (Tok::Word(_), Kw::Insert | Kw::Update | Kw::Delete | Kw::Merge) => {
                self.mark(Reason::DataModifying)
            }
            (Tok::Word(_), Kw::Into) => self.mark(Reason::SelectInto),
            (Tok::Word(_), Kw::Temp) if prev == Kw::Into && self.kind == Kind::Query => {
                self.pin(Pin::TempTable)
            }
            (Tok::LParen, _) => self.call(lists),
            _ => {}
        }
    }

    /// Follows `INSERT INTO name [AS alias] (` by one token.
    fn next_target(&self, tok: Tok<'a>, kw: Kw) -> InsertTarget {
        match (self.target, tok) {
            (_, Tok::Word(_)) if kw == Kw::Into && self.hist[0].1 == Kw::Insert => {
                InsertTarget::Expected
            }
            (InsertTarget::Expected | InsertTarget::Alias, Tok::Word(_) | Tok::Quoted(_)) => {
                InsertTarget::Named
            }
            (InsertTarget::Named, Tok::Dot) => InsertTarget::Expected,
            (InsertTarget::Named, Tok::Word(_)) if kw == Kw::As => InsertTarget::Alias,
            _ => InsertTarget::None,
        }
    }

    /// Advances the statement kind by one token.
    fn step(&mut self, tok: Tok<'a>, kw: Kw) {
        let word = matches!(tok, Tok::Word(_));
        self.kind = match self.kind {
            Kind::Empty => self.start(tok, kw),
            Kind::ExplainPrefix { first } => match (tok, kw) {
                (Tok::LParen, _) if first => Kind::ExplainOptions {
                    analyze_pending: false,
                },
                (Tok::Word(_), Kw::Analyze) => {
                    self.explain = Explain::Analyze;
                    Kind::ExplainPrefix { first: false }
                }
                (Tok::Word(_), Kw::Verbose) => Kind::ExplainPrefix { first: false },
                _ => self.start(tok, kw),
            },
            Kind::ExplainOptions { analyze_pending } => {
                self.explain_option(tok, kw, analyze_pending)
            }
            Kind::Copy(step) => Kind::Copy(self.copy_step(step, tok, kw)),
            Kind::StartTx if word && kw == Kw::Transaction => Kind::TxModes {
                of: ModesOf::Begin,
                read_only: None,
                serializable: false,
            },
            Kind::StartTx => Kind::Other,
            Kind::TxModes {
                of,
                read_only,
                serializable,
            } => Kind::TxModes {
                of,
                read_only: match (self.hist[0].1, kw) {
                    (Kw::Read, Kw::Only) => Some(true),
                    (Kw::Read, Kw::Write) => Some(false),
                    _ => read_only,
                },
                serializable: serializable || kw == Kw::Serializable,
            },
            Kind::TxEnd(control) => Kind::TxEnd(refine_tx_end(control, kw)),
            Kind::Prepare if kw == Kw::Transaction => Kind::TxEnd(TxControl::PrepareTransaction),
            Kind::Prepare => {
                self.pin(Pin::Prepare);
                Kind::Other
            }
            Kind::Set => self.set_target(tok, kw),
            Kind::SetSession if kw == Kw::Characteristics => Kind::TxModes {
                of: ModesOf::SessionCharacteristics,
                read_only: None,
                serializable: false,
            },
            Kind::SetSession => self.set_target(tok, kw),
            Kind::SetVar { watch: true } => self.watch_read_only(tok, kw),
            Kind::Reset | Kind::Discard => {
                if self.tokens == 2 && matches!(kw, Kw::All | Kw::DefaultTransactionReadOnly) {
                    self.session_read_only = Some(false);
                }
                self.kind
            }
            Kind::Create { prefix } => self.create_step(prefix, tok, kw),
            Kind::Declare if kw == Kw::Hold && self.hist[0].1 == Kw::With => {
                self.pin(Pin::HoldCursor);
                Kind::Declare
            }
            Kind::Declare if kw == Kw::For => Kind::Other,
            kind @ (Kind::Query
            | Kind::Show
            | Kind::SetVar { watch: false }
            | Kind::SetLocal
            | Kind::SetTransactionScoped
            | Kind::Declare
            | Kind::Write
            | Kind::Other) => kind,
        };
    }

    /// The kind a statement's first word gives it.
    fn start(&mut self, tok: Tok<'a>, kw: Kw) -> Kind {
        if tok == Tok::LParen {
            return Kind::Empty;
        }
        if !matches!(tok, Tok::Word(_)) {
            return Kind::Other;
        }
        if self.depth > 0 {
            // Only a query may sit in leading parentheses.
            return match kw {
                Kw::Select | Kw::Values | Kw::Table | Kw::With => Kind::Query,
                _ => Kind::Other,
            };
        }
        match kw {
            Kw::Select | Kw::Values | Kw::Table | Kw::With => Kind::Query,
            Kw::Show => Kind::Show,
            Kw::Explain if self.explain == Explain::No => {
                self.explain = Explain::Plain;
                Kind::ExplainPrefix { first: true }
            }
            Kw::Copy => Kind::Copy(CopyStep::Start),
            Kw::Begin => Kind::TxModes {
                of: ModesOf::Begin,
                read_only: None,
                serializable: false,
            },
            Kw::Start => Kind::StartTx,
            Kw::Commit | Kw::End => Kind::TxEnd(TxControl::Commit),
            Kw::Rollback | Kw::Abort => Kind::TxEnd(TxControl::Rollback),
            Kw::Savepoint => Kind::TxEnd(TxControl::Savepoint),
            Kw::Release => Kind::TxEnd(TxControl::Release),
            Kw::Prepare => Kind::Prepare,
            Kw::Set => Kind::Set,
            Kw::Reset => Kind::Reset,
            Kw::Discard => Kind::Discard,
            Kw::Create => Kind::Create { prefix: true },
            Kw::Insert | Kw::Update | Kw::Delete | Kw::Merge => Kind::Write,
            Kw::Declare => Kind::Declare,
            Kw::Do | Kw::Call | Kw::Load => {
                self.pin(match kw {
                    Kw::Do => Pin::Do,
                    Kw::Call => Pin::Call,
                    _ => Pin::Load,
                });
                Kind::Other
            }
            // UNLISTEN only removes listeners: a session that never listened (it would be pinned)
            // has none on any node, so it holds nothing to keep (asyncpg's pool sends `UNLISTEN
            // *` with every connection release).
            Kw::Listen => {
                self.pin(Pin::Listen);
                Kind::Other
            }
            _ => Kind::Other,
        }
    }

    /// `EXPLAIN (ANALYZE [boolean], ...)`: ANALYZE counts unless its value is false.
    fn explain_option(&mut self, tok: Tok<'a>, kw: Kw, analyze_pending: bool) -> Kind {
        let is_false = matches!(kw, Kw::False | Kw::No) || tok == Tok::Num(b"0");
        if analyze_pending && !is_false {
            self.explain = Explain::Analyze;
        }
        if tok == Tok::RParen && self.depth == 0 {
            return Kind::ExplainPrefix { first: false };
        }
        Kind::ExplainOptions {
            analyze_pending: kw == Kw::Analyze,
        }
    }

    /// `COPY name [(cols)] TO STDOUT` and `COPY (query) TO STDOUT` are reads; all else writes.
    fn copy_step(&mut self, step: CopyStep, tok: Tok<'a>, kw: Kw) -> CopyStep {
        match (step, tok) {
            (CopyStep::Start, Tok::LParen) => CopyStep::Query,
            (CopyStep::Start, Tok::Word(_) | Tok::Quoted(_)) => CopyStep::TableName,
            (CopyStep::TableName, _) if self.depth > 0 || tok == Tok::RParen => step,
            (CopyStep::TableName, Tok::Word(_)) if kw == Kw::To => CopyStep::To,
            (CopyStep::TableName, Tok::Word(_)) if kw == Kw::From => CopyStep::Rejected,
            (CopyStep::TableName, Tok::Word(_) | Tok::Quoted(_) | Tok::Dot | Tok::LParen) => step,
            (CopyStep::Query, Tok::RParen) if self.depth == 0 => CopyStep::AfterQuery,
            (CopyStep::Query, _) => step,
            (CopyStep::AfterQuery, Tok::Word(_)) if kw == Kw::To => CopyStep::To,
            (CopyStep::To, Tok::Word(_)) if kw == Kw::Stdout => CopyStep::ToStdout,
            (CopyStep::ToStdout, _) => step,
            _ => CopyStep::Rejected,
        }
    }

    /// After `SET` or `SET SESSION`: the scope and the variable.
    fn set_target(&mut self, tok: Tok<'a>, kw: Kw) -> Kind {
        match (self.kind, kw) {
            (Kind::Set, Kw::Local) => Kind::SetLocal,
            (Kind::Set, Kw::Session) => Kind::SetSession,
            (Kind::Set, Kw::Constraints) => Kind::SetTransactionScoped,
            (Kind::Set, Kw::Transaction) => Kind::TxModes {
                of: ModesOf::SetTransaction,
                read_only: None,
                serializable: false,
            },
            (_, Kw::DefaultTransactionReadOnly) => Kind::SetVar { watch: true },
            _ if matches!(tok, Tok::Word(_) | Tok::Quoted(_)) => Kind::SetVar { watch: false },
            _ => Kind::Other,
        }
    }

    /// The value of `SET default_transaction_read_only {TO|=} value`: only a plain "on" counts.
    fn watch_read_only(&mut self, tok: Tok<'a>, kw: Kw) -> Kind {
        if kw == Kw::To || tok == Tok::Op(b'=') {
            return Kind::SetVar { watch: true };
        }
        let on = match tok {
            Tok::Word(_) => matches!(kw, Kw::On | Kw::True),
            Tok::Num(n) => n == b"1",
            Tok::Str { body, .. } => [&b"on"[..], b"true", b"yes", b"1"]
                .iter()
                .any(|v| body.eq_ignore_ascii_case(v)),
            _ => false,
        };
        self.session_read_only = Some(on);
        Kind::SetVar { watch: false }
    }

    /// CREATE [OR REPLACE] [GLOBAL|LOCAL] TEMP ... pins; BEGIN ATOMIC bodies hold semicolons.
    fn create_step(&mut self, prefix: bool, tok: Tok<'a>, kw: Kw) -> Kind {
        if prefix && kw == Kw::Temp {
            self.pin(Pin::TempTable);
        }
        let still_prefix = prefix
            && match tok {
                Tok::Word(w) => {
                    kw == Kw::Local
                        || w.eq_ignore_ascii_case(b"or")
                        || w.eq_ignore_ascii_case(b"replace")
                        || w.eq_ignore_ascii_case(b"global")
                }
                _ => false,
            };
        match kw {
            Kw::Atomic if self.hist[0].1 == Kw::Begin => {
                self.atomic = self.atomic.saturating_add(1)
            }
            Kw::Case if self.atomic > 0 => self.atomic = self.atomic.saturating_add(1),
            Kw::End if self.atomic > 0 => self.atomic -= 1,
            _ => {}
        }
        Kind::Create {
            prefix: still_prefix,
        }
    }

    /// Whether the statement may run on a replica, or why not.
    fn verdict(&self) -> Result<(), Reason> {
        if let Some(reason) = self.failure {
            return Err(reason);
        }
        if self.explain == Explain::Plain {
            // Plain EXPLAIN only plans: nothing in the statement runs.
            return Ok(());
        }
        let body = || self.body_write.map_or(Ok(()), Err);
        match self.kind {
            Kind::Query | Kind::Copy(CopyStep::ToStdout) => body(),
            Kind::Show => Ok(()),
            Kind::TxModes {
                of: ModesOf::Begin,
                read_only: Some(true),
                serializable: false,
            } => Ok(()),
            Kind::TxModes {
                of: ModesOf::SetTransaction,
                read_only: None | Some(true),
                serializable: false,
            } => Ok(()),
            Kind::TxEnd(
                TxControl::Commit
                | TxControl::Rollback
                | TxControl::Savepoint
                | TxControl::Release
                | TxControl::RollbackToSavepoint,
            ) => Ok(()),
            _ => Err(Reason::Statement),
        }
    }

    /// Adds this statement to the classification of the whole string.
    pub(super) fn finish(mut self, out: &mut Classification) {
        if self.tokens == 0 && self.failure.is_none() {
            return;
        }
        if let Some(pending) = self.pending.take() {
            self.apply_call(pending.kind);
        }
        if !self.ends_at_semicolon() {
            // Unbalanced parentheses or an open BEGIN ATOMIC: the server rejects the text.
            self.fail(Reason::Unterminated);
        }
        out.statements = out.statements.saturating_add(1);
        if let Err(reason) = self.verdict() {
            out.read_only = false;
            out.reason.get_or_insert(reason);
        }
        if self.explain == Explain::Plain {
            return;
        }
        if let Some(pin) = self.pin {
            out.pin.get_or_insert(pin);
        }
        if self.unknown_call && out.hint != Some(Hint::Replica) {
            out.pin.get_or_insert(Pin::UnknownFunction);
        }
        out.set_config |= self.set_config;
        match self.kind {
            Kind::TxModes {
                of: ModesOf::Begin,
                read_only,
                serializable,
            } => {
                out.tx = Some(TxControl::Begin {
                    read_only: if serializable { Some(false) } else { read_only },
                })
            }
            Kind::TxEnd(control) => out.tx = Some(control),
            Kind::TxModes {
                of: ModesOf::SessionCharacteristics,
                read_only,
                serializable,
            } => {
                out.session_state = true;
                // A standby refuses serializable transactions, so that default cannot go there.
                if serializable {
                    out.session_read_only = Some(false);
                } else if read_only.is_some() {
                    out.session_read_only = read_only;
                }
            }
            Kind::SetLocal => out.local_setting = true,
            Kind::SetSession | Kind::SetVar { .. } | Kind::Reset | Kind::Discard => {
                out.session_state = true;
                if self.session_read_only.is_some() {
                    out.session_read_only = self.session_read_only;
                }
            }
            _ => {}
        }
    }
}

/// COMMIT PREPARED, ROLLBACK PREPARED and ROLLBACK ... TO [SAVEPOINT] are told by a later word.
fn refine_tx_end(control: TxControl, kw: Kw) -> TxControl {
    match (control, kw) {
        (TxControl::Commit, Kw::Prepared) => TxControl::CommitPrepared,
        (TxControl::Rollback, Kw::Prepared) => TxControl::RollbackPrepared,
        (TxControl::Rollback, Kw::To) => TxControl::RollbackToSavepoint,
        _ => control,
    }
}
