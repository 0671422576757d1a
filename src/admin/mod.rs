//! The admin HTTP API (JSON, bearer token) on its own listener: `GET /status`, `GET /events`
//! (the event log), `GET /metrics`
//! (Prometheus text; no token unless `admin.metrics_auth`), and
//! `POST /nodes/NAME/VERB` and `POST /switchover` for the operator's commands, which go to the
//! failover coordinator, and `POST /pause`, `POST /resume`, `POST /reload` (see `steer`).
//! The CLI (`pgvigil status`, `promote`, ...) is its client (`client`).

pub mod api;
pub mod client;
pub mod forward;
pub mod render;
pub(crate) mod status;
pub mod steer;

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, WWW_AUTHENTICATE};
use hyper::{Method, Request, Response, StatusCode};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::failover::Handle;
use crate::http_server::{self, authorized, bearer};
use crate::proxy::Proxy;
use api::{Command, Refusal};

/// What the request handler needs.
struct State {
    proxy: Arc<Proxy>,
    control: Handle,
    token: Option<String>,
}

/// Serves the admin API on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    control: Handle,
    token: Option<String>,
    shutdown: CancellationToken,
) {
    let state = Arc::new(State {
        proxy,
        control,
        token,
    });
    http_server::serve(listener, "admin API", shutdown, move |request| {
        let state = state.clone();
        async move { answer(&state, request).await }
    })
    .await;
}

/// The response to one request.
async fn answer(state: &State, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let is_metrics = request.method() == Method::GET && request.uri().path() == "/metrics";
    if is_metrics && !state.proxy.config().admin.metrics_auth {
        return metrics(state);
    }
    if !authorized(state.token.as_deref(), &request) {
        let mut response = json(
            StatusCode::UNAUTHORIZED,
            &Refusal::new(
                "the admin token is missing or wrong",
                "give the token in PGVIGIL_ADMIN_TOKEN or with --token-file",
            ),
        );
        response.headers_mut().insert(
            WWW_AUTHENTICATE,
            hyper::header::HeaderValue::from_static("Bearer"),
        );
        return response;
    }
    let path: Vec<&str> = request
        .uri()
        .path()
        .split('/')
        .filter(|p| !p.is_empty())
        .collect();
    let flag = |name: &str| {
        request.uri().query().is_some_and(|q| {
            q.split('&')
                .any(|p| p == name || p.strip_prefix(name) == Some("=true"))
        })
    };
    let (dry_run, reclone) = (flag("dry_run"), flag("reclone"));
    let value = |name: &str| {
        request.uri().query().and_then(|q| {
            q.split('&')
                .find_map(|p| p.strip_prefix(name)?.strip_prefix('='))
                .map(str::to_owned)
        })
    };
    if is_metrics {
        return metrics(state);
    }
    let command = match (request.method(), path.as_slice()) {
        (&Method::POST, ["switchover"]) => {
            let drain_timeout = match value("drain_timeout") {
                None => crate::failover::DEFAULT_DRAIN,
                Some(text) => match humantime::parse_duration(&text) {
                    Ok(duration) => duration,
                    Err(e) => {
                        return json(
                            StatusCode::BAD_REQUEST,
                            &Refusal::new(
                                format!("drain_timeout {text:?} is not a duration: {e}"),
                                "write it like 5s or 500ms",
                            ),
                        )
                    }
                },
            };
            Command::Switchover {
                to: value("to"),
                drain_timeout,
            }
        }
        (&Method::POST, ["pause"]) => {
            let wait = match value("timeout") {
                None => steer::DEFAULT_PAUSE_WAIT,
                Some(text) => match humantime::parse_duration(&text) {
                    Ok(duration) => duration,
                    Err(e) => {
                        return json(
                            StatusCode::BAD_REQUEST,
                            &Refusal::new(
                                format!("timeout {text:?} is not a duration: {e}"),
                                "write it like 60s or 500ms",
                            ),
                        )
                    }
                },
            };
            let wait = flag("wait").then_some(wait);
            return answered(steer::pause(&state.proxy, wait).await);
        }
        (&Method::POST, ["resume"]) => return answered(Ok(steer::resume(&state.proxy))),
        (&Method::POST, ["reload"]) => return answered(steer::reload(&state.proxy).await),
        (&Method::GET, ["events"]) => return json(StatusCode::OK, &state.proxy.events.list()),
        (&Method::GET, ["status"]) => {
            let mut status = status::status(&state.proxy, &state.control);
            status.cluster = status::cluster(&state.proxy).await;
            return json(StatusCode::OK, &status);
        }
        (&Method::POST, ["nodes", node, verb]) => match *verb {
            "attach" => Command::Attach((*node).to_owned()),
            "detach" => Command::Detach((*node).to_owned()),
            "unfence" => Command::Unfence((*node).to_owned()),
            "failback" => Command::Failback {
                node: (*node).to_owned(),
                reclone,
            },
            "promote" => Command::Promote {
                node: (*node).to_owned(),
                dry_run,
            },
            _ => return not_found(),
        },
        _ => return not_found(),
    };
    let token = bearer(&request).map(str::to_owned);
    let forwarded_by = request
        .headers()
        .get(forward::FORWARDED_BY)
        .and_then(|v| v.to_str().ok());
    match forward::to_leader(&state.proxy, &command, token, forwarded_by).await {
        forward::Forwarded::Here => {}
        forward::Forwarded::Answered(code, Ok(done)) => return json(code, &done),
        forward::Forwarded::Answered(code, Err(refusal)) => return json(code, &refusal),
    }
    answered(state.control.send(command).await)
}

/// A command's answer: 200 when done, 409 when refused.
fn answered(answer: Result<api::Done, Refusal>) -> Response<Full<Bytes>> {
    match answer {
        Ok(done) => json(StatusCode::OK, &done),
        Err(refusal) => json(StatusCode::CONFLICT, &refusal),
    }
}

/// `GET /metrics`: the Prometheus text exposition.
fn metrics(state: &State) -> Response<Full<Bytes>> {
    let proxy = &state.proxy;
    let status = status::status(proxy, &state.control);
    let logged_in = proxy.cancels.clients();
    let clients = crate::metrics::ClientCounts {
        logged_in: logged_in.len(),
        active: proxy.pause.in_flight(),
        waiting: logged_in
            .iter()
            .filter(|(_, c)| c.state() == crate::cancel::ClientState::Waiting)
            .count(),
    };
    let rendered = proxy.metrics.render(&status, clients);
    let mut response = Response::new(Full::new(Bytes::from(rendered)));
    response.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

fn not_found() -> Response<Full<Bytes>> {
    json(
        StatusCode::NOT_FOUND,
        &Refusal::new(
            "no such endpoint",
            "use GET /status, GET /events, GET /metrics, POST /pause[?wait=true&timeout=60s], POST /resume, POST /reload, POST /switchover[?to=NODE&drain_timeout=5s] or POST /nodes/NAME/{attach,detach,unfence,failback[?reclone=true],promote[?dry_run=true]}",
        ),
    )
}

fn json(code: StatusCode, body: &impl Serialize) -> Response<Full<Bytes>> {
    let text = serde_json::to_vec(body).unwrap_or_else(|e| {
        format!("{{\"refused\":\"cannot encode the answer: {e}\",\"next\":\"report this\"}}")
            .into_bytes()
    });
    let mut response = Response::new(Full::new(Bytes::from(text)));
    *response.status_mut() = code;
    response.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}
