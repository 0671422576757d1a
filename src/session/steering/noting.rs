//! What a client message forwarded to the session's current node does to the session: the
//! settings it changes (logged to replay elsewhere), what pins the session, whether it writes.

use pgvigil_proto::classify::Classification;
use pgvigil_proto::frontend::{self, Bind, Close, Parse, Query};

use super::{pin_reason, Steering};
use crate::config::PoolMode;
use crate::proxy::Proxy;
use crate::session::naming::{self, SqlDrop};
use crate::session::reset;
use crate::session::settings::{self, SetConfig};

impl Steering {
    /// Applies what one forwarded client message does to the session; `parse`: the message
    /// read as a Parse, when it is a well-formed one.
    pub(super) fn note_forwarded(
        &mut self,
        tag: u8,
        frame: &[u8],
        parse: Option<Parse<'_>>,
        proxy: &Proxy,
    ) {
        let covered = self.covered >= frame.len();
        self.covered = self.covered.saturating_sub(frame.len());
        let body = frame.get(5..).unwrap_or_default();
        match tag {
            frontend::tag::QUERY => {
                self.replay.unnamed_dropped();
                self.replay.settings.request();
                self.replay.naming.request();
                // Inspected, its text is known without reading the message again.
                let inspected = covered.then(|| self.unit.query_sql(frame)).flatten();
                let Some(sql) = inspected.or_else(|| Query::parse(body).ok().map(|q| q.sql)) else {
                    return;
                };
                let (session_state, statements, set_config, read_only) = if covered {
                    let u = &self.unit;
                    (
                        u.session_state,
                        u.query_statements,
                        u.set_config,
                        u.read_only,
                    )
                } else {
                    let c = proxy.classifier.query(sql);
                    self.uncovered(&c);
                    (c.session_state, c.statements, c.set_config, c.read_only)
                };
                // Neither statement is read-only: a read is not read again for them.
                if !read_only
                    && matches!(
                        naming::sql_drop(sql),
                        Some(SqlDrop::DeallocateAll | SqlDrop::DiscardAll)
                    )
                    && proxy.config().pool.mode == PoolMode::Transaction
                {
                    self.replay.drop_statements();
                }
                if session_state {
                    self.record_state(sql, statements, true);
                }
                if set_config {
                    self.note_set_config(sql, true);
                }
            }
            frontend::tag::PARSE => {
                if let Some(parse) = parse {
                    self.parsed(frame, parse, covered, proxy);
                }
            }
            frontend::tag::BIND if !covered => self.bound_unseen(body),
            frontend::tag::BIND if self.unit.session_state => {
                if let Ok(bind) = Bind::parse(body) {
                    self.bound_state(bind.statement);
                }
            }
            frontend::tag::CLOSE => {
                if let Ok(close) = Close::parse(body) {
                    if close.kind == b'S' && !close.name.is_empty() {
                        self.replay.closed(close.name, self.current);
                    }
                }
            }
            frontend::tag::FUNCTION_CALL => {
                self.replay.settings.request();
                self.replay.naming.request();
                self.note_write();
                self.pin("a fast-path function call");
            }
            frontend::tag::SYNC => {
                self.replay.settings.request();
                self.replay.naming.request();
            }
            _ => {}
        }
    }

    /// Notes what a statement forwarded to `current` that calls `set_config` does: a setting
    /// with constants is recorded like SET; one whose value cannot be known pins the session.
    fn note_set_config(&mut self, sql: &[u8], query: bool) {
        match settings::set_config(sql) {
            SetConfig::Session => self.record_state(sql, 1, query),
            SetConfig::Local => {}
            SetConfig::Unknown => self.pin("set_config with values pgvigil cannot know"),
        }
    }

    fn parsed(&mut self, frame: &[u8], parse: Parse<'_>, covered: bool, proxy: &Proxy) {
        let known = match (covered, parse.name.is_empty(), self.unit.unnamed) {
            (true, true, Some(class)) if !self.unit.session_state => Some(class),
            _ => None,
        };
        let class = known.unwrap_or_else(|| proxy.classifier.parse(parse.sql));
        if !covered {
            self.uncovered(&class);
        }
        if class.session_state {
            self.record_state(parse.sql, class.statements, false);
        }
        if class.set_config {
            self.note_set_config(parse.sql, false);
        }
        let session_pooling = proxy.config().pool.mode == PoolMode::Session;
        if parse.name.is_empty() {
            self.replay.parsed_unnamed(self.current, class);
            if session_pooling {
                // Its answer comes in turn with the named ones' (see `naming`).
                self.replay.naming.sent_unnamed();
            } else {
                self.replay.naming.classified_unnamed(class);
            }
        } else if session_pooling {
            self.replay
                .parsed_named(parse.name, frame, class, self.current);
        }
        // Under transaction pooling a named statement is recorded once the server answers its
        // Parse (see `Steering::name_statement` and `naming`).
    }

    /// A Bind forwarded without having been inspected (it followed a Flush): running a named
    /// statement that may write is a write. (An unnamed one was judged at its Parse.)
    fn bound_unseen(&mut self, body: &[u8]) {
        let Ok(bind) = Bind::parse(body) else {
            return;
        };
        if bind.statement.is_empty() {
            return;
        }
        let writes = self
            .replay
            .statements()
            .get(bind.statement)
            .is_none_or(|p| !p.class.read_only && !p.class.lone_setting());
        if writes {
            self.note_write();
        }
        self.bound_state(bind.statement);
    }

    /// A Bind of named statement `name`: one that changes session state does so each time it
    /// runs, so it is noted again (its Parse was noted once), to replay in order.
    fn bound_state(&mut self, name: &[u8]) {
        let Some(prepared) = self.replay.statements().get(name) else {
            return;
        };
        if name.is_empty() || !prepared.class.session_state {
            return;
        }
        let (parse, statements) = (prepared.parse.clone(), prepared.class.statements);
        if let Ok(parse) = Parse::parse(parse.get(5..).unwrap_or_default()) {
            self.record_state(parse.sql, statements, false);
        }
    }

    /// Effects of a statement forwarded without having been inspected (it followed a Flush, or
    /// the unit was larger than the lookahead).
    fn uncovered(&mut self, class: &Classification) {
        if !class.read_only && !class.lone_setting() {
            self.note_write();
        }
        if let Some(pin) = class.pin {
            self.pin(pin_reason(pin));
        }
        if let Some(read_only) = class.session_read_only {
            self.default_read_only = read_only;
        }
    }

    /// Notes a session-state statement sent to `current`, to replay on the session's other
    /// nodes once it took effect; `in_query`: sent in a Query (else in a Parse).
    fn record_state(&mut self, sql: &[u8], statements: usize, in_query: bool) {
        if statements > 1 {
            // Replaying the whole string could repeat its other statements.
            self.pin("session state changed in a multi-statement string");
            return;
        }
        if reset::resets_all(sql) {
            // Not run by pgvigil (see `reset`): the log cannot follow a named one run again,
            // and a replayed DISCARD ALL would drop other sessions' statements.
            self.pin("RESET ALL or DISCARD ALL that pgvigil did not run itself");
            return;
        }
        self.replay.settings.sent(sql, in_query);
    }
}
