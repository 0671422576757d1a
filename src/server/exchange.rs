//! Statements pgvigil runs on a server connection itself (settings, resets, probes), each read
//! up to ReadyForQuery.

use bytes::{Bytes, BytesMut};
use pgvigil_proto::{backend, encode};

use super::{ServerConn, ServerError};

impl ServerConn {
    /// Runs one statement pgvigil itself needs (SET, DISCARD ALL) and waits for ReadyForQuery.
    pub async fn run_internal(&mut self, sql: &str) -> Result<(), ServerError> {
        self.query_text(sql).await.map(|_| ())
    }

    /// Runs one statement and returns the first column of its first row as text (None when it
    /// returns no row or NULL).
    pub async fn query_text(&mut self, sql: &str) -> Result<Option<String>, ServerError> {
        self.query(sql, None).await
    }

    /// Runs statements for the client (see `session::reset`), as [`ServerConn::query_text`]
    /// does, and appends every NoticeResponse the node sent to `notices`.
    pub async fn query_for_client(
        &mut self,
        sql: &str,
        notices: &mut BytesMut,
    ) -> Result<(), ServerError> {
        self.query(sql, Some(notices)).await.map(|_| ())
    }

    /// Runs a Query string for the client (see `session::reset::string`) and returns every
    /// message the node answered it with up to ReadyForQuery, in order, without ReadyForQuery
    /// and ParameterStatus (both noted on the connection). An ErrorResponse is one of the
    /// messages: it is the client's answer, not a failure of the connection.
    pub async fn query_answers(&mut self, sql: &str) -> Result<Vec<Bytes>, ServerError> {
        let mut out = BytesMut::new();
        encode::query(&mut out, sql.as_bytes());
        // The node drops the unnamed statement on any simple Query it reads.
        self.statements.set_unnamed(false);
        let mut answers = Vec::new();
        self.exchange_each(&mut out, |_, frame| answers.push(frame))
            .await?;
        Ok(answers)
    }

    async fn query(
        &mut self,
        sql: &str,
        notices: Option<&mut BytesMut>,
    ) -> Result<Option<String>, ServerError> {
        let mut out = BytesMut::new();
        encode::query(&mut out, sql.as_bytes());
        let result = self.exchange_noting(&mut out, notices).await;
        if let Ok(_) | Err(ServerError::Rejected { .. }) = result {
            // The node ran (or refused) a simple Query, which drops the unnamed statement.
            self.statements.set_unnamed(false);
        }
        result
    }

    /// Sends `messages` (ending with Sync or a Query) and reads everything up to ReadyForQuery;
    /// an ErrorResponse becomes `Rejected` once the node is ready again. Returns the first
    /// column of the first DataRow, if any, as text.
    pub async fn exchange(
        &mut self,
        messages: &mut BytesMut,
    ) -> Result<Option<String>, ServerError> {
        self.exchange_noting(messages, None).await
    }

    /// [`ServerConn::exchange`], appending every NoticeResponse to `notices` if given.
    async fn exchange_noting(
        &mut self,
        messages: &mut BytesMut,
        mut notices: Option<&mut BytesMut>,
    ) -> Result<Option<String>, ServerError> {
        let mut failure = None;
        let mut value = None;
        self.exchange_each(messages, |tag, frame| match tag {
            backend::tag::ERROR_RESPONSE => failure = Some(frame),
            backend::tag::DATA_ROW if value.is_none() => value = first_column(&frame[5..]),
            backend::tag::NOTICE_RESPONSE => {
                if let Some(notices) = notices.as_deref_mut() {
                    notices.extend_from_slice(&frame);
                }
            }
            _ => {}
        })
        .await?;
        match failure {
            Some(frame) => Err(self.rejected(frame)),
            None => Ok(value),
        }
    }

    /// Sends `messages` and hands every message the node answers with to `each` (tag, whole
    /// frame) up to ReadyForQuery, but ReadyForQuery and ParameterStatus, noted here.
    async fn exchange_each(
        &mut self,
        messages: &mut BytesMut,
        mut each: impl FnMut(u8, Bytes),
    ) -> Result<(), ServerError> {
        self.send(messages).await?;
        loop {
            let (tag, frame) = self.read_frame().await?;
            match tag {
                backend::tag::READY_FOR_QUERY => {
                    self.tx =
                        backend::ReadyForQuery::parse(&frame[5..]).map_err(|e| self.protocol(e))?;
                    return Ok(());
                }
                backend::tag::PARAMETER_STATUS => self.note_parameter(&frame[5..])?,
                _ => each(tag, frame),
            }
        }
    }
}

/// The first column of a DataRow body as text (None when NULL or malformed).
fn first_column(body: &[u8]) -> Option<String> {
    let count = u16::from_be_bytes(body.get(..2)?.try_into().ok()?);
    if count == 0 {
        return None;
    }
    let len = i32::from_be_bytes(body.get(2..6)?.try_into().ok()?);
    let len = usize::try_from(len).ok()?;
    let value = body.get(6..6 + len)?;
    Some(String::from_utf8_lossy(value).into_owned())
}
