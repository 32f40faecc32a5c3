//! The lab's Nostr relay: a real relay (rust-nostr's `nostr-relay-builder`, events in LMDB under the lab dir) on
//! its own loopback port, with control routes to stop and start it (for "relay down" tests) and to plant events
//! that a real relay would refuse (forged cards for discovery tests).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::rejection::JsonRejection;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use hyper_util::rt::TokioIo;
use nostr_lmdb::NostrLMDB;
use nostr_relay_builder::builder::{PolicyResult, RateLimit, WritePolicy};
use nostr_relay_builder::prelude::{
    BoxedFuture, Event, Filter, NostrDatabase, RejectedReason, SaveEventStatus,
};
use nostr_relay_builder::{LocalRelay, RelayBuilder};
use serde::Deserialize;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// LMDB reserves its whole map as address space up front; the lab's relay never holds more than a few MB.
const MAP_SIZE: usize = 1 << 30;
/// Events a single connection may publish per minute. A public relay allows about 60; tests publish in bursts.
const NOTES_PER_MINUTE: u32 = 10_000;
/// Open subscriptions per connection.
const MAX_REQS: usize = 500;
/// Answer size of a REQ without a `limit` (nostr-relay-builder's default).
const DEFAULT_LIMIT: usize = 500;
/// How long a stop waits for open connections before cutting them.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Errors of the relay and its control routes.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("opening the relay's event store in {path}: {reason}")]
    Store { path: PathBuf, reason: String },
    #[error("binding the relay to {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    BadRequest(String),
    #[error("the relay did not store the event: {0}")]
    Rejected(&'static str),
    #[error("the relay's event store failed: {0}")]
    Database(String),
}

impl RelayError {
    /// The `kind` of the control API's error body.
    pub fn kind(&self) -> &'static str {
        match self {
            RelayError::Store { .. } => "store",
            RelayError::Bind { source, .. } if source.kind() == std::io::ErrorKind::AddrInUse => {
                "port_in_use"
            }
            RelayError::Bind { .. } => "bind",
            RelayError::BadRequest(_) => "bad_request",
            RelayError::Rejected(_) => "rejected",
            RelayError::Database(_) => "database",
        }
    }

    fn status_code(&self) -> StatusCode {
        match self {
            RelayError::BadRequest(_) => StatusCode::BAD_REQUEST,
            RelayError::Rejected(_) => StatusCode::CONFLICT,
            RelayError::Bind { source, .. } if source.kind() == std::io::ErrorKind::AddrInUse => {
                StatusCode::CONFLICT
            }
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for RelayError {
    fn into_response(self) -> Response {
        let body = Json(json!({ "error": self.to_string(), "kind": self.kind() }));
        (self.status_code(), body).into_response()
    }
}

/// A running (or stopped) lab relay. Cheap to clone; the last clone to go stops it.
#[derive(Clone)]
pub struct Relay {
    inner: Arc<Inner>,
}

struct Inner {
    addr: SocketAddr,
    store_dir: PathBuf,
    database: Arc<NostrLMDB>,
    relay: LocalRelay,
    /// The listener and its connections while the relay is up; `None` while stopped. The async lock serialises
    /// stop and start, so a start never races the previous listener for the port.
    serving: tokio::sync::Mutex<Option<Serving>>,
}

struct Serving {
    cancel: CancellationToken,
    server: tokio::task::JoinHandle<()>,
    sessions: TaskTracker,
}

impl Relay {
    /// Opens (or resumes) the event store in `dir` and serves the relay on `listener`.
    pub async fn start(dir: &Path, listener: TcpListener) -> Result<Relay, RelayError> {
        let store_err = |reason: String| RelayError::Store {
            path: dir.to_path_buf(),
            reason,
        };
        std::fs::create_dir_all(dir).map_err(|e| store_err(e.to_string()))?;
        let store_dir = dir.to_path_buf();
        // LMDB opens with blocking file I/O.
        let database = tokio::task::spawn_blocking(move || {
            NostrLMDB::builder(&store_dir).map_size(MAP_SIZE).build()
        })
        .await
        .map_err(|e| store_err(e.to_string()))?
        .map_err(|e| store_err(e.to_string()))?;
        let database = Arc::new(database);
        let builder = RelayBuilder::default()
            .database(Arc::clone(&database))
            .rate_limit(RateLimit {
                max_reqs: MAX_REQS,
                notes_per_minute: NOTES_PER_MINUTE,
            })
            .default_filter_limit(DEFAULT_LIMIT)
            .write_policy(LabWritePolicy {
                database: Arc::clone(&database),
            });
        let addr = listener.local_addr().map_err(|source| RelayError::Bind {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            source,
        })?;
        let inner = Inner {
            addr,
            store_dir: dir.to_path_buf(),
            database,
            relay: LocalRelay::new(builder),
            serving: tokio::sync::Mutex::new(None),
        };
        let serving = inner.serve(listener);
        *inner.serving.lock().await = Some(serving);
        tracing::info!(url = %format!("ws://{addr}"), dir = %dir.display(), "nostr relay up");
        Ok(Relay {
            inner: Arc::new(inner),
        })
    }

    /// `ws://127.0.0.1:PORT`, the same across stops and starts.
    pub fn url(&self) -> String {
        format!("ws://{}", self.inner.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// Where the events are stored (LMDB).
    pub fn store_dir(&self) -> &Path {
        &self.inner.store_dir
    }

    pub async fn is_running(&self) -> bool {
        self.inner.serving.lock().await.is_some()
    }

    /// Stored events (all kinds, all authors).
    pub async fn event_count(&self) -> Result<usize, RelayError> {
        self.inner
            .database
            .count(Filter::new())
            .await
            .map_err(|e| RelayError::Database(e.to_string()))
    }

    /// Takes the relay down: the port stops accepting (clients get "connection refused") and open connections
    /// are cut, as when a relay crashes. Stored events stay. Does nothing if it is already stopped.
    pub async fn stop(&self) {
        let mut serving = self.inner.serving.lock().await;
        if let Some(serving) = serving.take() {
            serving.stop().await;
            tracing::info!(url = %self.url(), "nostr relay stopped");
        }
    }

    /// Brings a stopped relay back on the same port, with the same events. Does nothing if it is running.
    pub async fn restart(&self) -> Result<(), RelayError> {
        let mut serving = self.inner.serving.lock().await;
        if serving.is_some() {
            return Ok(());
        }
        let listener = bind_again(self.inner.addr).await?;
        *serving = Some(self.inner.serve(listener));
        tracing::info!(url = %self.url(), "nostr relay started again");
        Ok(())
    }

    /// Stops the relay for good (same as [`Relay::stop`]; the store closes when the last clone goes).
    pub async fn shutdown(&self) {
        self.stop().await;
    }

    /// Stops serving without waiting: for `Drop` paths that cannot await.
    pub fn halt(&self) {
        if let Ok(mut serving) = self.inner.serving.try_lock() {
            if let Some(serving) = serving.take() {
                serving.halt();
            }
        }
    }

    /// Plants an event as given, without checking its id or signature, and delivers it to open subscriptions.
    /// A real relay refuses forged events; tests of clients that must ignore them need one on the relay anyway.
    /// Ephemeral kinds are delivered only. Returns whether the event was stored.
    pub async fn inject(&self, event: Event) -> Result<bool, RelayError> {
        if event.kind.is_ephemeral() {
            self.inner.relay.notify_event(event);
            return Ok(false);
        }
        let status = self
            .inner
            .database
            .save_event(&event)
            .await
            .map_err(|e| RelayError::Database(e.to_string()))?;
        match status {
            SaveEventStatus::Success => {
                // No open subscription is not an error: the event is stored for later REQs.
                self.inner.relay.notify_event(event);
                Ok(true)
            }
            SaveEventStatus::Rejected(reason) => Err(RelayError::Rejected(rejected_reason(reason))),
        }
    }

    /// Control routes: `GET /lab/relay`, `POST /lab/relay/stop`, `POST /lab/relay/start`,
    /// `POST /lab/relay/inject`.
    pub fn control_router(&self) -> Router {
        Router::new()
            .route("/lab/relay", get(status_route))
            .route("/lab/relay/stop", post(stop_route))
            .route("/lab/relay/start", post(start_route))
            .route("/lab/relay/inject", post(inject_route))
            .with_state(self.clone())
    }

    async fn status_json(&self) -> Result<serde_json::Value, RelayError> {
        Ok(json!({
            "url": self.url(),
            "running": self.is_running().await,
            "events": self.event_count().await?,
        }))
    }
}

impl Inner {
    /// Serves HTTP on `listener`: websocket upgrades go to the relay, plain GETs get the NIP-11 document.
    fn serve(&self, listener: TcpListener) -> Serving {
        let cancel = CancellationToken::new();
        let sessions = TaskTracker::new();
        let state = HttpState {
            relay: self.relay.clone(),
            cancel: cancel.clone(),
            sessions: sessions.clone(),
        };
        let app = Router::new()
            .fallback(relay_http)
            .with_state(state)
            .into_make_service_with_connect_info::<SocketAddr>();
        let shutdown = cancel.clone().cancelled_owned();
        let server = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await
            {
                tracing::error!(error = %e, "nostr relay server stopped");
            }
        });
        Serving {
            cancel,
            server,
            sessions,
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(serving) = self.serving.get_mut().take() {
            serving.halt();
        }
    }
}

impl Serving {
    async fn stop(self) {
        self.cancel.cancel();
        self.sessions.close();
        let mut server = self.server;
        // The listener is released when the server task ends; only then may the port be bound again.
        if tokio::time::timeout(STOP_GRACE, &mut server).await.is_err() {
            server.abort();
            let _ = server.await;
        }
        let _ = tokio::time::timeout(STOP_GRACE, self.sessions.wait()).await;
    }

    fn halt(self) {
        self.cancel.cancel();
        self.sessions.close();
        self.server.abort();
    }
}

/// Binds the relay's port again after a stop. The old listener is gone by then; a short retry covers the kernel
/// releasing it, not another process taking the port.
async fn bind_again(addr: SocketAddr) -> Result<TcpListener, RelayError> {
    let started = Instant::now();
    loop {
        match TcpListener::bind(addr).await {
            Ok(listener) => return Ok(listener),
            Err(e)
                if e.kind() == std::io::ErrorKind::AddrInUse
                    && started.elapsed() < Duration::from_secs(1) =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(source) => return Err(RelayError::Bind { addr, source }),
        }
    }
}

#[derive(Clone)]
struct HttpState {
    relay: LocalRelay,
    cancel: CancellationToken,
    sessions: TaskTracker,
}

/// Everything that reaches the relay's port: a websocket upgrade (the relay protocol), or a plain HTTP request
/// (NIP-11 relay information with `Accept: application/nostr+json`, else a short text).
async fn relay_http(
    State(state): State<HttpState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    mut req: Request,
) -> Response {
    if is_websocket_upgrade(req.headers()) {
        return accept_websocket(state, peer, &mut req);
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return (
            StatusCode::METHOD_NOT_ALLOWED,
            "a Nostr relay: connect with a websocket (NIP-01)\n",
        )
            .into_response();
    }
    let wants_info = req
        .headers()
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/nostr+json"));
    if wants_info {
        let mut response = Json(relay_information()).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/nostr+json"),
        );
        // NIP-11: web clients fetch this cross-origin.
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            HeaderValue::from_static("*"),
        );
        return response;
    }
    (
        StatusCode::OK,
        "automaton-lab Nostr relay: connect with a websocket (NIP-01); NIP-11 information with \
         Accept: application/nostr+json\n",
    )
        .into_response()
}

fn is_websocket_upgrade(headers: &HeaderMap) -> bool {
    let has_token = |name: header::HeaderName, token: &str| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    has_token(header::CONNECTION, "upgrade") && has_token(header::UPGRADE, "websocket")
}

/// Completes the RFC 6455 handshake and hands the upgraded stream to the relay in a task of this listener's
/// tracker, so a stop can cut it.
fn accept_websocket(state: HttpState, peer: SocketAddr, req: &mut Request) -> Response {
    if req.method() != Method::GET {
        return (
            StatusCode::METHOD_NOT_ALLOWED,
            "a websocket handshake is a GET\n",
        )
            .into_response();
    }
    let version_ok = req
        .headers()
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_some_and(|v| v.as_bytes() == b"13");
    if !version_ok {
        let mut response = (
            StatusCode::UPGRADE_REQUIRED,
            "unsupported websocket version (13 expected)\n",
        )
            .into_response();
        response.headers_mut().insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        return response;
    }
    let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY) else {
        return (StatusCode::BAD_REQUEST, "missing Sec-WebSocket-Key\n").into_response();
    };
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let Some(on_upgrade) = req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>() else {
        return (
            StatusCode::BAD_REQUEST,
            "this connection cannot be upgraded\n",
        )
            .into_response();
    };
    let Ok(accept) = HeaderValue::from_str(&accept) else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    let HttpState {
        relay,
        cancel,
        sessions,
    } = state;
    sessions.spawn(async move {
        let session = async {
            let upgraded = on_upgrade.await.map_err(|e| e.to_string())?;
            relay
                .take_connection(TokioIo::new(upgraded), peer)
                .await
                .map_err(|e| e.to_string())
        };
        tokio::select! {
            _ = cancel.cancelled() => {}
            ended = session => {
                if let Err(e) = ended {
                    // nostr-relay-builder ends a session on a message it cannot parse.
                    tracing::debug!(%peer, error = %e, "nostr relay session ended");
                }
            }
        }
    });
    let mut response = StatusCode::SWITCHING_PROTOCOLS.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    response
}

/// The NIP-11 relay information document.
fn relay_information() -> serde_json::Value {
    json!({
        "name": "automaton-lab",
        "description": "The Automaton-LN lab's Nostr relay: nostr-relay-builder with an LMDB event store, \
                        loopback only.",
        "software": "nostr-relay-builder",
        "version": "0.44",
        "supported_nips": [1, 9, 11, 40, 42, 45, 70, 77],
        "limitation": {
            "max_subscriptions": MAX_REQS,
            "max_subid_length": 250,
            "default_limit": DEFAULT_LIMIT,
            "auth_required": false,
            "payment_required": false,
            "restricted_writes": false,
        },
    })
}

/// Rules nostr-relay-builder leaves to policies, with the reason a client reads in `["OK", id, false, "blocked:
/// …"]`: NIP-40 expiry, stale versions of replaceable / addressable events, and NIP-09 deletions of someone
/// else's events (the store refuses those two as well, but its answer would only say "error: unknown").
#[derive(Debug)]
struct LabWritePolicy {
    database: Arc<NostrLMDB>,
}

impl WritePolicy for LabWritePolicy {
    fn admit_event<'a>(
        &'a self,
        event: &'a Event,
        _addr: &'a SocketAddr,
    ) -> BoxedFuture<'a, PolicyResult> {
        Box::pin(async move {
            if event.is_expired() {
                return PolicyResult::Reject("the event has expired (NIP-40)".into());
            }
            match self.refusal(event).await {
                Ok(Some(reason)) => PolicyResult::Reject(reason),
                Ok(None) => PolicyResult::Accept,
                // The store itself will answer if it is broken.
                Err(e) => {
                    tracing::warn!(error = %e, "nostr relay write policy could not read the store");
                    PolicyResult::Accept
                }
            }
        })
    }
}

impl LabWritePolicy {
    async fn refusal(&self, event: &Event) -> Result<Option<String>, String> {
        let kind = event.kind;
        if kind.is_replaceable() || kind.is_addressable() {
            let mut filter = Filter::new().kind(kind).author(event.pubkey).limit(1);
            if kind.is_addressable() {
                match event.tags.identifier() {
                    Some(d) => filter = filter.identifier(d),
                    // Without a `d` tag the store keeps every version; nothing to compare with.
                    None => return Ok(None),
                }
            }
            let stored = self
                .database
                .query(filter)
                .await
                .map_err(|e| e.to_string())?;
            if let Some(stored) = stored.first() {
                // NIP-01: the newest wins; on equal timestamps, the lowest id.
                let newer = stored.created_at > event.created_at
                    || (stored.created_at == event.created_at && stored.id < event.id);
                if newer {
                    return Ok(Some(format!(
                        "a newer version of this event is stored ({})",
                        stored.id
                    )));
                }
            }
        }
        if kind == nostr_relay_builder::prelude::Kind::EventDeletion {
            for id in event.tags.event_ids() {
                let target = self
                    .database
                    .event_by_id(id)
                    .await
                    .map_err(|e| e.to_string())?;
                if target.is_some_and(|t| t.pubkey != event.pubkey) {
                    return Ok(Some(format!(
                        "event {id} belongs to another author: a deletion may only delete its author's own events \
                         (NIP-09)"
                    )));
                }
            }
            if event
                .tags
                .coordinates()
                .any(|c| c.public_key != event.pubkey)
            {
                return Ok(Some(
                    "an `a` tag names another author: a deletion may only delete its author's own events (NIP-09)"
                        .into(),
                ));
            }
        }
        Ok(None)
    }
}

fn rejected_reason(reason: RejectedReason) -> &'static str {
    match reason {
        RejectedReason::Ephemeral => "ephemeral events are not stored",
        RejectedReason::Duplicate => "the relay already has this event",
        RejectedReason::Deleted => "the event was deleted (NIP-09)",
        RejectedReason::Expired => "the event has expired (NIP-40)",
        RejectedReason::Replaced => "a newer version of this event is stored",
        RejectedReason::InvalidDelete => {
            "a deletion may only delete its author's own events (NIP-09)"
        }
        RejectedReason::Other => "the store refused it",
    }
}

async fn status_route(State(relay): State<Relay>) -> Result<Json<serde_json::Value>, RelayError> {
    Ok(Json(relay.status_json().await?))
}

async fn stop_route(State(relay): State<Relay>) -> Result<Json<serde_json::Value>, RelayError> {
    relay.stop().await;
    Ok(Json(relay.status_json().await?))
}

async fn start_route(State(relay): State<Relay>) -> Result<Json<serde_json::Value>, RelayError> {
    relay.restart().await?;
    Ok(Json(relay.status_json().await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InjectRequest {
    event: serde_json::Value,
}

async fn inject_route(
    State(relay): State<Relay>,
    payload: Result<Json<InjectRequest>, JsonRejection>,
) -> Result<Json<serde_json::Value>, RelayError> {
    let Json(req) = payload.map_err(|e| RelayError::BadRequest(e.body_text()))?;
    let event: Event = serde_json::from_value(req.event)
        .map_err(|e| RelayError::BadRequest(format!("not a Nostr event: {e}")))?;
    let id = event.id.to_hex();
    let stored = relay.inject(event).await?;
    Ok(Json(json!({ "id": id, "stored": stored })))
}
