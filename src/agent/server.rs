//! The agent's HTTP API: `GET /status`, `POST /stop`, `/start`, `/rewind`, `/reclone`,
//! `/make-standby`, each behind the bearer token, one action at a time, each carried out by the
//! `local` driver and bounded by its timeout.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, WWW_AUTHENTICATE};
use hyper::{Method, Request, Response, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::api::{ActionDone, AgentRefusal, ServerStatus, SourceRequest, StandbyRequest};
use crate::node_control::{
    ControlError, Local, NodeControl, Output, OwnSettings, ServerState, Source,
};

/// Largest request body accepted (a source or settings document is well under 1 KiB).
const MAX_BODY: usize = 64 * 1024;

/// What the request handler needs.
pub(super) struct Served {
    /// The server's control.
    pub(super) local: Local,
    /// The token every request must carry, if any.
    pub(super) token: Option<String>,
    /// Held while an action (or the bootstrap) runs: actions never overlap.
    pub(super) busy: Mutex<()>,
}

/// Serves the API on `listener` until `shutdown`.
pub(super) async fn serve(listener: TcpListener, served: Arc<Served>, shutdown: CancellationToken) {
    crate::http_server::serve(listener, "agent API", shutdown, move |request| {
        let served = served.clone();
        async move { answer(&served, request).await }
    })
    .await;
}

/// An action on the server and what it needs.
enum Act {
    Stop,
    Start,
    Rewind(Source),
    Reclone(Source),
    MakeStandby(OwnSettings),
}

impl Act {
    fn name(&self) -> &'static str {
        match self {
            Act::Stop => "stop",
            Act::Start => "start",
            Act::Rewind(_) => "rewind",
            Act::Reclone(_) => "reclone",
            Act::MakeStandby(_) => "make-standby",
        }
    }

    /// Why the server is not in a state this action can run in, if it is not.
    fn refused_in(&self, status: &ServerStatus) -> Option<String> {
        let running = status.state == ServerState::Running;
        match self {
            Act::Stop => (!running).then(|| "the server is not running".into()),
            _ if running => Some(format!(
                "the server runs: {} needs it stopped (POST /stop)",
                self.name()
            )),
            Act::Reclone(_) => None,
            _ if !status.initialised => Some(format!(
                "the data directory holds no cluster: {} needs one (POST /reclone)",
                self.name()
            )),
            _ => None,
        }
    }

    async fn run(self, local: &Local) -> Result<Output, ControlError> {
        match self {
            Act::Stop => local.stop().await,
            Act::Start => local.start().await,
            Act::Rewind(source) => local.rewind(&source).await,
            Act::Reclone(source) => local.reclone(&source).await,
            Act::MakeStandby(settings) => local.make_standby(&settings).await.map(|()| {
                "wrote the standby settings to postgresql.auto.conf and standby.signal".into()
            }),
        }
    }
}

/// The response to one request.
async fn answer(served: &Served, request: Request<Incoming>) -> Response<Full<Bytes>> {
    if !crate::http_server::authorized(served.token.as_deref(), &request) {
        let mut response = refusal(
            StatusCode::UNAUTHORIZED,
            "the agent token is missing or wrong: give it as a bearer token (pgvigil reads it \
             from nodes.control.token_file or PGVIGIL_AGENT_TOKEN)",
        );
        response.headers_mut().insert(
            WWW_AUTHENTICATE,
            hyper::header::HeaderValue::from_static("Bearer"),
        );
        return response;
    }
    let method = request.method().clone();
    let path = request.uri().path().trim_end_matches('/').to_owned();
    let act = match (&method, path.as_str()) {
        (&Method::GET, "/status") => {
            return match status(&served.local).await {
                Ok(status) => json(StatusCode::OK, &status),
                Err(e) => failed(&e),
            }
        }
        (&Method::POST, "/stop") => Act::Stop,
        (&Method::POST, "/start") => Act::Start,
        (&Method::POST, "/rewind") => match body::<SourceRequest>(request).await {
            Ok(body) => Act::Rewind(body.source),
            Err(response) => return response,
        },
        (&Method::POST, "/reclone") => match body::<SourceRequest>(request).await {
            Ok(body) => Act::Reclone(body.source),
            Err(response) => return response,
        },
        (&Method::POST, "/make-standby") => match body::<StandbyRequest>(request).await {
            Ok(body) => Act::MakeStandby(body.settings),
            Err(response) => return response,
        },
        _ => return refusal(
            StatusCode::NOT_FOUND,
            "no such endpoint: GET /status, POST /stop, /start, /rewind, /reclone, /make-standby",
        ),
    };
    let Ok(_busy) = served.busy.try_lock() else {
        return refusal(
            StatusCode::CONFLICT,
            "another action is running on this server; retry when it is done",
        );
    };
    let now = match status(&served.local).await {
        Ok(now) => now,
        Err(e) => return failed(&e),
    };
    if let Some(reason) = act.refused_in(&now) {
        return refusal(StatusCode::CONFLICT, &reason);
    }
    let name = act.name();
    info!(action = name, "agent: carrying out");
    match act.run(&served.local).await {
        Ok(output) => {
            info!(action = name, "agent: done");
            json(StatusCode::OK, &ActionDone { output })
        }
        Err(e) => {
            warn!(action = name, error = %e, "agent: action failed");
            failed(&e)
        }
    }
}

/// What the server's status is now.
pub(super) async fn status(local: &Local) -> Result<ServerStatus, ControlError> {
    let state = local.state().await?;
    let cluster_state = local.cluster_state().await?;
    let in_recovery = match (state, cluster_state.as_deref()) {
        (ServerState::Running, Some("in archive recovery")) => Some(true),
        (ServerState::Running, Some("in production")) => Some(false),
        _ => None,
    };
    Ok(ServerStatus {
        state,
        initialised: local.data_dir().join("PG_VERSION").is_file(),
        cluster_state,
        in_recovery,
        standby_signal: local.data_dir().join("standby.signal").is_file(),
    })
}

/// The request's JSON body as `T`, or a 400 response saying why not.
async fn body<T: DeserializeOwned>(request: Request<Incoming>) -> Result<T, Response<Full<Bytes>>> {
    let bytes = Limited::new(request.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| {
            refusal(
                StatusCode::BAD_REQUEST,
                &format!("unreadable body (at most {MAX_BODY} bytes): {e}"),
            )
        })?
        .to_bytes();
    serde_json::from_slice(&bytes).map_err(|e| {
        refusal(
            StatusCode::BAD_REQUEST,
            &format!("the body is not the expected JSON document: {e}"),
        )
    })
}

/// 504 when the action ran out of time, 500 for any other failure.
fn failed(e: &ControlError) -> Response<Full<Bytes>> {
    let code = match e {
        ControlError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    refusal(code, &e.to_string())
}

fn refusal(code: StatusCode, error: &str) -> Response<Full<Bytes>> {
    json(
        code,
        &AgentRefusal {
            error: error.to_owned(),
        },
    )
}

fn json(code: StatusCode, body: &impl Serialize) -> Response<Full<Bytes>> {
    let text = serde_json::to_vec(body).unwrap_or_else(|e| {
        format!("{{\"error\":\"cannot encode the answer: {e}\"}}").into_bytes()
    });
    let mut response = Response::new(Full::new(Bytes::from(text)));
    *response.status_mut() = code;
    response.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}
