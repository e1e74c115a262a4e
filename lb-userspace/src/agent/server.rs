//! The control API (unix socket) and the metrics listener (TCP): axum routers whose handlers
//! send [`Command`]s to the agent's loop, served by hyper with bounded resources.
//!
//! What bounds what:
//! - connections: at most `Limits::connections` open per listener (a semaphore taken before
//!   `accept`; further peers wait in the kernel's backlog). Idle keep-alive connections hold a
//!   file descriptor and buffers as much as busy ones, so it is connections that are counted,
//!   not requests in flight; HTTP/1 serves one request at a time per connection, so requests in
//!   flight are bounded too.
//! - reading: the request head must arrive within `header_read` (hyper; this also closes a
//!   keep-alive connection that stays idle that long), the whole call within `request`
//!   (tower-http's timeout, body included), and a body is at most `body` bytes (413).
//! - writing: a peer that stops reading loses its connection after `write` without progress.
//!
//! Every answer that is not a 2xx is JSON: `{"error": "..."}` ([`ApiError`]).

use std::{future::Future, io, sync::Arc, time::Duration};

use axum::{
    body::{Body, Bytes},
    extract::{FromRequest, Request, State},
    http::{header, HeaderValue, StatusCode, Uri},
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use serde::de::DeserializeOwned;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, UnixListener},
    sync::{mpsc, oneshot, Semaphore},
};
use tower_http::{limit::RequestBodyLimitLayer, timeout::TimeoutLayer};
use tracing::{debug, warn};

use super::commands::{Command, Failure};
use crate::api::{
    self, ApiError, DrainRequest, DrainStatus, Plan, PlanRequest, ReloadReply, Status, TargetReply,
    TargetRequest,
};

/// The bounds of one listener.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Open connections at most.
    pub connections: usize,
    /// Largest request body (the API takes small JSON).
    pub body: usize,
    /// Largest body of `POST /v1/plan` (a config to preview).
    pub config_body: usize,
    /// Time to send a request's head (and the longest a keep-alive connection stays idle).
    pub header_read: Duration,
    /// Time for a whole call, from its head to its answer.
    pub request: Duration,
    /// Time a pending write may make no progress.
    pub write: Duration,
}

pub const LIMITS: Limits = Limits {
    connections: 32,
    body: 64 * 1024,
    config_body: 1024 * 1024,
    header_read: Duration::from_secs(5),
    // Under the CLI's 30 s, so that a call the agent is too slow for gets an answer.
    request: Duration::from_secs(25),
    write: Duration::from_secs(5),
};

/// The commands' way to the agent's loop.
type Commands = mpsc::Sender<Command>;

/// The control API on the unix socket: the status, targets, reload and plan, and the metrics.
/// Bodies are small JSON (`Limits::body`), but for a config to preview (`Limits::config_body`).
pub fn api_router(commands: Commands, limits: Limits) -> Router {
    let small = Router::new()
        .route(api::STATUS, get(status))
        .route(api::REGISTER, post(register))
        .route(api::DEREGISTER, post(deregister))
        .route(api::RELOAD, post(reload))
        .route(api::METRICS, get(metrics))
        .route(api::DRAIN, post(drain).get(drain_status))
        .layer(RequestBodyLimitLayer::new(limits.body));
    let config = Router::new()
        .route(api::PLAN, post(plan))
        .layer(RequestBodyLimitLayer::new(limits.config_body));
    let router = small
        .merge(config)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(commands);
    limited(router, limits)
}

/// The TCP listener (`agent.metrics`): what only reads. Nothing that changes the agent is
/// served here.
pub fn metrics_router(commands: Commands, limits: Limits) -> Router {
    let router = Router::new()
        .route(api::METRICS, get(metrics))
        .route(api::STATUS, get(status))
        // The status page (`/` and its files), which reads GET /v1/status above.
        .merge(crate::web::router())
        .layer(RequestBodyLimitLayer::new(limits.body))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(commands);
    limited(router, limits)
}

/// The limits of every route (their bodies' sizes are set with the routes), the outermost
/// last: the call's deadline, and errors from these layers made JSON.
fn limited(router: Router, limits: Limits) -> Router {
    router
        .layer(TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            limits.request,
        ))
        .layer(axum::middleware::map_response(json_errors))
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        (self.status, Json(ApiError { error: self.error })).into_response()
    }
}

/// Sends a command to the agent's loop and waits for its answer.
async fn ask<T>(
    commands: &Commands,
    command: impl FnOnce(oneshot::Sender<T>) -> Command,
) -> Result<T, Failure> {
    let (reply, answer) = oneshot::channel();
    if commands.send(command(reply)).await.is_err() {
        return Err(Failure::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the agent is shutting down",
        ));
    }
    answer.await.map_err(|_| {
        Failure::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the agent dropped the call",
        )
    })
}

async fn status(State(commands): State<Commands>) -> Result<Json<Status>, Failure> {
    ask(&commands, Command::Status).await.map(Json)
}

async fn metrics(State(commands): State<Commands>) -> Result<Response, Failure> {
    let page = ask(&commands, Command::Metrics).await?;
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
        )],
        page,
    )
        .into_response())
}

async fn register(
    State(commands): State<Commands>,
    JsonBody(request): JsonBody<TargetRequest>,
) -> Result<Json<TargetReply>, Failure> {
    ask(&commands, |r| Command::Register(request, r))
        .await?
        .map(Json)
}

async fn deregister(
    State(commands): State<Commands>,
    JsonBody(request): JsonBody<TargetRequest>,
) -> Result<Json<TargetReply>, Failure> {
    ask(&commands, |r| Command::Deregister(request, r))
        .await?
        .map(Json)
}

async fn reload(State(commands): State<Commands>) -> Result<Json<ReloadReply>, Failure> {
    ask(&commands, Command::Reload).await?.map(Json)
}

async fn plan(
    State(commands): State<Commands>,
    JsonBody(request): JsonBody<PlanRequest>,
) -> Result<Json<Plan>, Failure> {
    ask(&commands, |r| Command::Plan(request, r))
        .await?
        .map(Json)
}

/// An empty body is `{}` (start draining).
async fn drain(
    State(commands): State<Commands>,
    body: Bytes,
) -> Result<Json<DrainStatus>, Failure> {
    let request: DrainRequest = if body.iter().all(u8::is_ascii_whitespace) {
        DrainRequest::default()
    } else {
        parse_body(&body)?
    };
    ask(&commands, |r| Command::Drain(request, r))
        .await?
        .map(Json)
}

async fn drain_status(State(commands): State<Commands>) -> Result<Json<DrainStatus>, Failure> {
    ask(&commands, Command::DrainStatus).await.map(Json)
}

async fn not_found(uri: Uri) -> Failure {
    Failure::new(
        StatusCode::NOT_FOUND,
        format!("no such endpoint {}", uri.path()),
    )
}

async fn method_not_allowed() -> Failure {
    Failure::new(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
}

/// A JSON request body, whatever its `Content-Type` (`curl -d` sends a form type). A body that
/// does not read as `T` is a 400 naming the field; one over the limit a 413.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = Failure;

    async fn from_request(req: Request, state: &S) -> Result<Self, Failure> {
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|e| Failure::new(e.status(), e.body_text()))?;
        parse_body(&bytes).map(JsonBody)
    }
}

/// Reads `T` from JSON; the message names the field at fault (`target: invalid socket address
/// syntax`), or says what is wrong with the whole (`missing field `group``).
pub fn parse_body<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Failure> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        Failure::bad_request(if path == "." {
            format!("bad request body: {inner}")
        } else {
            format!("bad request body: {path}: {inner}")
        })
    })?;
    de.end()
        .map_err(|e| Failure::bad_request(format!("bad request body: {e}")))?;
    Ok(value)
}

/// Makes every error answer JSON (`{"error": ...}`): those of the layers (413 for a body over
/// the limit, 503 for a call over its deadline) come as text or empty.
async fn json_errors(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|t| t.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&text).trim().to_string();
    let error = match (text.is_empty(), status) {
        (false, _) => text,
        (true, StatusCode::SERVICE_UNAVAILABLE) => "the call took too long".into(),
        (true, s) => s.canonical_reason().unwrap_or("error").to_lowercase(),
    };
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let body = serde_json::to_vec(&ApiError { error }).expect("a string serializes");
    Response::from_parts(parts, Body::from(body))
}

/// A listener whose connections are served.
pub trait Listen: Send + 'static {
    type Io: AsyncRead + AsyncWrite + Send + Unpin + 'static;
    fn accept(&self) -> impl Future<Output = io::Result<Self::Io>> + Send;
}

impl Listen for UnixListener {
    type Io = tokio::net::UnixStream;
    async fn accept(&self) -> io::Result<Self::Io> {
        UnixListener::accept(self).await.map(|(s, _)| s)
    }
}

impl Listen for TcpListener {
    type Io = tokio::net::TcpStream;
    async fn accept(&self) -> io::Result<Self::Io> {
        TcpListener::accept(self).await.map(|(s, _)| s)
    }
}

/// After a failed accept (out of file descriptors, say), the next try.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Serves `app` on `listener` for ever, within `limits` (`what` names it in the log).
pub async fn serve<L: Listen>(listener: L, app: Router, limits: Limits, what: &'static str) {
    let slots = Arc::new(Semaphore::new(limits.connections));
    loop {
        let slot = Arc::clone(&slots)
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let io = match listener.accept().await {
            Ok(io) => io,
            Err(e) => {
                warn!(error = %e, "{what}: accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let app = app.clone();
        tokio::spawn(async move {
            let mut io = tokio_io_timeout::TimeoutStream::new(io);
            io.set_write_timeout(Some(limits.write));
            let served = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read)
                .serve_connection(TokioIo::new(Box::pin(io)), TowerToHyperService::new(app))
                .await;
            if let Err(e) = served {
                debug!(error = %e, "{what}: connection ended");
            }
            drop(slot);
        });
    }
}

#[cfg(test)]
mod tests;
