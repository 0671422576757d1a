//! The small HTTP/1.1 server the admin API and the agent share: an accept loop that serves each
//! connection with hyper until shutdown, and the bearer-token check.

use std::convert::Infallible;
use std::future::Future;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::AUTHORIZATION;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// Accepts connections on `listener` until `shutdown` and answers each request with `answer`;
/// `what` names the server in the log.
pub async fn serve<H, F>(
    listener: TcpListener,
    what: &'static str,
    shutdown: CancellationToken,
    answer: H,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    warn!(error = %e, "{what}: accept failed");
                    continue;
                }
            },
        };
        let answer = answer.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let answered = answer(request);
                async move { Ok::<_, Infallible>(answered.await) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = shutdown.cancelled() => {}
                served = connection => if let Err(e) = served {
                    debug!(error = %e, "{what} connection ended with an error");
                },
            }
        });
    }
}

/// Whether the request carries the token (any request does when there is none).
pub fn authorized(token: Option<&str>, request: &Request<Incoming>) -> bool {
    let Some(token) = token else {
        return true;
    };
    let given = bearer(request).unwrap_or("");
    crate::auth::constant_time_eq(given.as_bytes(), token.as_bytes())
}

/// The bearer token the request carries, if any.
pub fn bearer(request: &Request<Incoming>) -> Option<&str> {
    request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
}
