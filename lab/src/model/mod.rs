//! The lab's scripted model: an OpenAI-compatible chat-completions server whose answers come from a small
//! deterministic policy (see `policy`), plainly named "scripted" and never passed off as an LLM.
//!
//! `POST /v1/chat/completions` (tools, `tool_choice`, `usage`, `n`, `max_tokens`, `stream` with
//! `stream_options.include_usage`), `GET /v1/models`, `GET /v1/models/{id}`. Errors use OpenAI's
//! `{"error": {...}}` bodies and status codes.

mod conversation;
mod policy;
mod prompt;
mod schema;
mod wire;

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderValue, Method, StatusCode, Uri};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

pub use policy::{GATED_TOOLS, SLEEP_SECONDS};
pub use wire::{CONTEXT_WINDOW, FINGERPRINT, MODEL_ID};

use prompt::{Prompt, ScenarioKind};
use wire::{ApiError, Completion};

/// The longest delay `lab-scenario: slow SECS` may ask for.
const MAX_SLOW_SECS: u64 = 600;
/// Requests larger than the real API's limits are still read, so the context check can answer them.
const MAX_BODY_BYTES: usize = 64 * 1024 * 1024;

#[derive(Default)]
struct ServerState {
    /// Attempts seen per request digest, for `lab-scenario: flaky`.
    attempts: Mutex<HashMap<[u8; 32], u64>>,
    requests: AtomicU64,
}

impl ServerState {
    fn attempt(&self, digest: [u8; 32]) -> u64 {
        let mut attempts = match self.attempts.lock() {
            Ok(guard) => guard,
            // A panic elsewhere cannot leave a counter map inconsistent; keep counting.
            Err(poisoned) => poisoned.into_inner(),
        };
        let count = attempts.entry(digest).or_insert(0);
        *count += 1;
        *count
    }
}

/// The model's routes under `/v1`, with fresh state (flaky-scenario counters).
pub fn router() -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{id}", get(get_model))
        .fallback(unknown_route)
        .method_not_allowed_fallback(wrong_method)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(Arc::new(ServerState::default()))
}

/// Serves the model on `listener` until the process ends.
pub async fn serve(listener: tokio::net::TcpListener) -> anyhow::Result<()> {
    axum::serve(listener, router())
        .await
        .context("scripted model server failed")
}

/// Serves the model on `listener` until `shutdown` completes, then finishes open requests.
pub async fn serve_with_shutdown(
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    axum::serve(listener, router())
        .with_graceful_shutdown(shutdown)
        .await
        .context("scripted model server failed")
}

/// `automaton-lab model --listen ADDR`: serves until Ctrl-C or SIGTERM, printing the base URL on stderr.
pub async fn cli_main(listen: String) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let address = listener.local_addr().context("listener has no address")?;
    eprintln!("scripted model listening on http://{address}/v1 (model id \"{MODEL_ID}\")");
    serve_with_shutdown(listener, stop_signal()).await
}

async fn stop_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs())
        .unwrap_or(0)
}

fn model_object() -> Value {
    json!({"id": MODEL_ID, "object": "model", "created": wire::MODEL_CREATED, "owned_by": FINGERPRINT})
}

async fn list_models() -> Json<Value> {
    Json(json!({"object": "list", "data": [model_object()]}))
}

async fn get_model(Path(id): Path<String>) -> Response {
    if id == MODEL_ID {
        return Json(model_object()).into_response();
    }
    ApiError::NotFound {
        message: format!("The model '{id}' does not exist"),
        code: Some("model_not_found"),
    }
    .into_response()
}

async fn unknown_route(method: Method, uri: Uri) -> Response {
    ApiError::NotFound {
        message: format!("Invalid URL ({method} {})", uri.path()),
        code: None,
    }
    .into_response()
}

async fn wrong_method(method: Method, uri: Uri) -> Response {
    let body = json!({"error": {
        "message": format!("Invalid method for URL ({method} {})", uri.path()),
        "type": "invalid_request_error", "param": null, "code": null
    }});
    (StatusCode::METHOD_NOT_ALLOWED, Json(body)).into_response()
}

async fn chat_completions(State(state): State<Arc<ServerState>>, body: Bytes) -> Response {
    let started = Instant::now();
    let sequence = state.requests.fetch_add(1, Ordering::Relaxed);
    let mut response = answer(&state, &body).await;
    let request_id = {
        let mut hasher = Sha256::new();
        hasher.update(&body);
        hasher.update(sequence.to_le_bytes());
        format!("req_{}", hex::encode(&hasher.finalize()[..16]))
    };
    let headers = response.headers_mut();
    for (name, value) in [
        ("x-request-id", request_id),
        ("openai-version", "2020-10-01".to_owned()),
        (
            "openai-processing-ms",
            started.elapsed().as_millis().to_string(),
        ),
    ] {
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(name, value);
        }
    }
    response
}

async fn answer(state: &ServerState, body: &[u8]) -> Response {
    let request = match wire::parse_request(body) {
        Ok(request) => request,
        Err(error) => {
            tracing::info!(%error, "scripted model: rejected request");
            return error.into_response();
        }
    };
    let prompt = Prompt::read(&request.conversation);
    for name in &prompt.unknown_scenarios {
        tracing::warn!(scenario = %name, "scripted model: unknown lab-scenario ignored");
    }
    if let Some(scenario) = prompt.scenario(ScenarioKind::Error) {
        let status = scenario
            .number()
            .and_then(|status| u16::try_from(status).ok())
            .unwrap_or(500);
        return ApiError::Scripted { status }.into_response();
    }
    if let Some(scenario) = prompt.scenario(ScenarioKind::Flaky) {
        let failures = scenario.number().unwrap_or(2);
        if state.attempt(request.digest) <= failures {
            return ApiError::Scripted { status: 500 }.into_response();
        }
    }
    if let Some(scenario) = prompt.scenario(ScenarioKind::Slow) {
        let seconds = scenario.number().unwrap_or(5).min(MAX_SLOW_SECS);
        tokio::time::sleep(Duration::from_secs(seconds)).await;
    }
    let window = prompt
        .scenario(ScenarioKind::Context)
        .and_then(|scenario| scenario.number())
        .and_then(|tokens| u32::try_from(tokens).ok())
        .unwrap_or(CONTEXT_WINDOW);
    if request.prompt_tokens > window {
        return ApiError::ContextLengthExceeded {
            limit: window,
            requested: request.prompt_tokens,
        }
        .into_response();
    }

    let reply = policy::decide(&request.conversation, &prompt);
    match &reply {
        conversation::Reply::Call { name, .. } => {
            tracing::info!(tool = %name, messages = request.conversation.messages.len(), "scripted model: tool call")
        }
        conversation::Reply::Text(_) => {
            tracing::info!(
                messages = request.conversation.messages.len(),
                "scripted model: text answer"
            )
        }
    }
    let completion = Completion::new(&request, &reply, unix_now());
    if !request.stream {
        return Json(completion.to_json()).into_response();
    }
    let events: Vec<Result<Event, Infallible>> = completion
        .chunks(request.include_usage)
        .into_iter()
        .map(|chunk| Event::default().data(chunk.to_string()))
        .chain(std::iter::once(Event::default().data("[DONE]")))
        .map(Ok)
        .collect();
    Sse::new(futures::stream::iter(events)).into_response()
}
