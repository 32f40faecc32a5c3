//! The Conway double: Conway Cloud's sandbox API subset (`../shared/specs/conway-api.md`) backed by local
//! sandboxes (a directory each; every command in its own process group), with prepaid credits, the raw-key
//! `Authorization` quirk, and fault injection for the client's retry rules (intermittent 404s, 429/5xx bursts,
//! hangs, alternative field names).

pub mod sandbox;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path as UrlPath, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{from_fn_with_state, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;

use crate::lnvps::procs;

/// Credits a fresh lab account holds (USD cents).
pub const INITIAL_BALANCE_CENTS: u64 = 10_000;

/// A sandbox size and its monthly price (prepaid at creation).
#[derive(Debug, Clone, Serialize)]
pub struct Tier {
    pub name: &'static str,
    pub vcpu: u32,
    pub memory_mb: u64,
    pub disk_gb: u64,
    pub monthly_cents: u64,
}

/// The sizes the original client chose from (smallest first).
pub fn tiers() -> Vec<Tier> {
    let tier = |name, vcpu, memory_mb, disk_gb, monthly_cents| Tier {
        name,
        vcpu,
        memory_mb,
        disk_gb,
        monthly_cents,
    };
    vec![
        tier("nano", 1, 512, 5, 500),
        tier("micro", 1, 1024, 10, 1_000),
        tier("small", 2, 2048, 20, 2_000),
        tier("medium", 2, 4096, 40, 4_000),
        tier("large", 4, 8192, 80, 8_000),
    ]
}

/// Fault injection and deployment variants, set through `/lab/conway/faults`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Faults {
    /// The next n requests to a valid route answer 404 (the load balancer's routing bug). File reads are spared:
    /// there a 404 means "no such file" and clients must not retry it.
    pub not_found_count: u32,
    /// The next `error_count` requests answer `error_status` (429 with `Retry-After: 1`).
    pub error_status: Option<u16>,
    pub error_count: u32,
    /// The next `delay_count` requests wait `delay_ms` first (a hang past the client's timeout).
    pub delay_ms: u64,
    pub delay_count: u32,
    /// Answer with the alternative field names older deployments use (`sandbox_id`, `exitCode`, `publicUrl`,
    /// `credits_cents`, `id`, `new_balance_cents`).
    pub alt_fields: bool,
    /// `GET /v1/sandboxes` as `{"sandboxes": [...]}` instead of a bare array.
    pub list_object: bool,
    /// File reads as `{"content": …}` instead of a text body.
    pub files_read_json: bool,
    /// Credit transfers served on `/v1/credits/transfers` only (the singular path answers 404).
    pub transfer_plural: bool,
}

/// What the double remembers across `up`s (`DIR/conway/state.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Store {
    api_key: String,
    balance_cents: u64,
    sandboxes: BTreeMap<String, SandboxRecord>,
    transfers: Vec<Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct SandboxRecord {
    id: String,
    name: String,
    region: String,
    vcpu: u32,
    memory_mb: u64,
    disk_gb: u64,
    monthly_cents: u64,
    created_at: DateTime<Utc>,
}

/// Remembered results of calls carrying an `Idempotency-Key`.
#[derive(Default)]
struct Replays {
    results: HashMap<String, Arc<OnceCell<(StatusCode, Value)>>>,
    order: VecDeque<String>,
}

const MAX_REMEMBERED: usize = 10_000;

impl Replays {
    fn cell(&mut self, key: String) -> Arc<OnceCell<(StatusCode, Value)>> {
        if let Some(c) = self.results.get(&key) {
            return Arc::clone(c);
        }
        if self.order.len() >= MAX_REMEMBERED {
            if let Some(old) = self.order.pop_front() {
                self.results.remove(&old);
            }
        }
        let cell = Arc::new(OnceCell::new());
        self.results.insert(key.clone(), Arc::clone(&cell));
        self.order.push_back(key);
        cell
    }
}

pub struct Inner {
    dir: PathBuf,
    store: Mutex<Store>,
    faults: Mutex<Faults>,
    replays: Mutex<Replays>,
    exposed: Mutex<HashMap<(String, u16), sandbox::Exposed>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConwayError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("reading {path}: {source}")]
    State {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// The running double.
pub struct Conway {
    inner: Arc<Inner>,
    addr: SocketAddr,
    cancel: CancellationToken,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn random_hex(bytes: usize) -> String {
    use rand::RngCore;
    let mut b = vec![0u8; bytes];
    rand::thread_rng().fill_bytes(&mut b);
    hex::encode(b)
}

impl Conway {
    /// Opens (or resumes) the double stored under `dir` and serves it on `listener`. The API key is generated on
    /// first start and kept.
    pub async fn start(dir: &Path, listener: TcpListener) -> Result<Conway, ConwayError> {
        let io = |what: String| move |source| ConwayError::Io { what, source };
        std::fs::create_dir_all(dir.join("sandboxes"))
            .map_err(io(format!("creating {}", dir.display())))?;
        let dir = dir
            .canonicalize()
            .map_err(io(format!("resolving {}", dir.display())))?;
        let addr = listener
            .local_addr()
            .map_err(io("reading the Conway listener's address".into()))?;
        let path = dir.join("state.json");
        let store = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| ConwayError::State {
                path: path.clone(),
                source,
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Store {
                api_key: format!("cnwy_k_{}", random_hex(24)),
                balance_cents: INITIAL_BALANCE_CENTS,
                sandboxes: BTreeMap::new(),
                transfers: Vec::new(),
            },
            Err(e) => return Err(io(format!("reading {}", path.display()))(e)),
        };
        let inner = Arc::new(Inner {
            dir,
            store: Mutex::new(store),
            faults: Mutex::new(Faults::default()),
            replays: Mutex::new(Replays::default()),
            exposed: Mutex::new(HashMap::new()),
        });
        inner.save(&lock(&inner.store));
        let cancel = CancellationToken::new();
        let app = router(Arc::clone(&inner));
        let stop = cancel.clone();
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await
            {
                tracing::error!(error = %e, "Conway double server stopped");
            }
        });
        Ok(Conway {
            inner,
            addr,
            cancel,
            task: Mutex::new(Some(task)),
        })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The API key the double accepts (raw, in `Authorization`).
    pub fn api_key(&self) -> String {
        lock(&self.inner.store).api_key.clone()
    }

    /// A sandbox's directory (its home and working directory).
    pub fn sandbox_dir(&self, id: &str) -> PathBuf {
        self.inner.sandbox_dir(id)
    }

    /// `/lab/conway/*` control routes.
    pub fn control_router(&self) -> Router {
        Router::new()
            .route("/lab/conway", get(control_overview))
            .route("/lab/conway/credits", post(control_credits))
            .route("/lab/conway/faults", get(get_faults).post(set_faults))
            .with_state(Arc::clone(&self.inner))
    }

    /// Stops the server, closes exposed ports and kills every sandbox process. Idempotent.
    pub async fn shutdown(&self) {
        self.cancel.cancel();
        let task = lock(&self.task).take();
        if let Some(task) = task {
            let abort = task.abort_handle();
            if tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
        let inner = Arc::clone(&self.inner);
        let _ = tokio::task::spawn_blocking(move || inner.kill_everything()).await;
    }

    /// Synchronous stop for `Drop` paths.
    pub fn halt(&self) {
        self.cancel.cancel();
        if let Some(task) = lock(&self.task).take() {
            task.abort();
        }
        self.inner.kill_everything();
    }
}

impl Drop for Conway {
    fn drop(&mut self) {
        self.halt();
    }
}

impl Inner {
    fn save(&self, store: &Store) {
        let path = self.dir.join("state.json");
        let tmp = self.dir.join("state.json.tmp");
        let result = serde_json::to_vec_pretty(store)
            .map_err(std::io::Error::other)
            .and_then(|b| std::fs::write(&tmp, b))
            .and_then(|()| {
                use std::os::unix::fs::PermissionsExt;
                // The file holds the API key.
                std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
            })
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = result {
            tracing::error!(error = %e, "saving the Conway double's state failed");
        }
    }

    fn sandbox_dir(&self, id: &str) -> PathBuf {
        self.dir.join("sandboxes").join(id)
    }

    fn kill_everything(&self) {
        lock(&self.exposed).clear();
        let ids: Vec<String> = lock(&self.store).sandboxes.keys().cloned().collect();
        for id in ids {
            procs::kill_scope(&sandbox::scope(&id), None);
        }
    }

    fn alt(&self) -> bool {
        lock(&self.faults).alt_fields
    }

    fn sandbox_json(&self, s: &SandboxRecord) -> Value {
        let id_key = if self.alt() { "sandbox_id" } else { "id" };
        json!({
            id_key: s.id,
            "name": s.name,
            "status": "running",
            "region": s.region,
            "vcpu": s.vcpu,
            "memory_mb": s.memory_mb,
            "disk_gb": s.disk_gb,
            "terminal_url": null,
            "created_at": s.created_at,
        })
    }
}

/// A JSON error with its status.
struct ApiError(StatusCode, Value);

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError(status, json!({ "error": message.into() }))
    }
    fn not_found(what: &str) -> ApiError {
        Self::new(StatusCode::NOT_FOUND, format!("{what} not found"))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(self.1)).into_response()
    }
}

fn body<T>(payload: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    payload
        .map(|Json(v)| v)
        .map_err(|e| ApiError::new(e.status(), e.body_text()))
}

fn router(inner: Arc<Inner>) -> Router {
    Router::new()
        .route("/v1/sandboxes", post(create_sandbox).get(list_sandboxes))
        .route("/v1/sandboxes/{id}", delete(delete_sandbox))
        .route("/v1/sandboxes/{id}/exec", post(exec))
        .route("/v1/sandboxes/{id}/files/upload/json", post(upload))
        .route("/v1/sandboxes/{id}/files/read", get(read_file))
        .route("/v1/sandboxes/{id}/ports/expose", post(expose))
        .route("/v1/sandboxes/{id}/ports/{port}", delete(unexpose))
        .route("/v1/credits/balance", get(balance))
        .route("/v1/credits/pricing", get(pricing))
        .route("/v1/credits/transfer", post(transfer_singular))
        .route("/v1/credits/transfers", post(transfer_plural))
        // Inside-out: faults answer before auth (a load balancer does), auth before the handlers.
        .route_layer(from_fn_with_state(Arc::clone(&inner), authenticate))
        .route_layer(from_fn_with_state(Arc::clone(&inner), inject_faults))
        .with_state(inner)
}

/// Raw key in `Authorization`, no scheme: missing → 401, anything else (a `Bearer` prefix included) → 403.
async fn authenticate(State(inner): State<Arc<Inner>>, req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::trim);
    match given {
        None | Some("") => {
            ApiError::new(StatusCode::UNAUTHORIZED, "Missing API key").into_response()
        }
        Some(k) if k == lock(&inner.store).api_key => next.run(req).await,
        Some(_) => ApiError::new(StatusCode::FORBIDDEN, "Invalid API key").into_response(),
    }
}

async fn inject_faults(State(inner): State<Arc<Inner>>, req: Request, next: Next) -> Response {
    let is_file_read = req.uri().path().ends_with("/files/read");
    let (delay, fault) = {
        let mut f = lock(&inner.faults);
        let delay = (f.delay_count > 0).then(|| {
            f.delay_count -= 1;
            Duration::from_millis(f.delay_ms)
        });
        let fault = if f.error_count > 0 {
            f.error_count -= 1;
            Some(f.error_status.unwrap_or(500))
        } else if f.not_found_count > 0 && !is_file_read {
            f.not_found_count -= 1;
            Some(404)
        } else {
            None
        };
        (delay, fault)
    };
    if let Some(d) = delay {
        tokio::time::sleep(d).await;
    }
    match fault {
        None => next.run(req).await,
        Some(code) => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let mut resp = ApiError::new(
                status,
                status.canonical_reason().unwrap_or("Injected fault"),
            )
            .into_response();
            if status == StatusCode::TOO_MANY_REQUESTS {
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            resp
        }
    }
}

/// The sandbox `id`, if it exists.
fn sandbox(inner: &Inner, id: &str) -> Result<SandboxRecord, ApiError> {
    lock(&inner.store)
        .sandboxes
        .get(id)
        .cloned()
        .ok_or_else(|| ApiError::not_found("Sandbox"))
}

#[derive(Deserialize)]
struct CreateSandbox {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    vcpu: Option<u32>,
    #[serde(default)]
    memory_mb: Option<u64>,
    #[serde(default)]
    disk_gb: Option<u64>,
    #[serde(default)]
    region: Option<String>,
}

async fn create_sandbox(
    State(inner): State<Arc<Inner>>,
    payload: Result<Json<CreateSandbox>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let req = body(payload)?;
    let (vcpu, memory, disk) = (
        req.vcpu.unwrap_or(1),
        req.memory_mb.unwrap_or(512),
        req.disk_gb.unwrap_or(5),
    );
    let tier = tiers()
        .into_iter()
        .find(|t| t.vcpu >= vcpu && t.memory_mb >= memory && t.disk_gb >= disk)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("No sandbox size fits {vcpu} vCPU, {memory} MB, {disk} GB"),
            )
        })?;
    let id = format!("sbx_{}", random_hex(8));
    let record = {
        let mut store = lock(&inner.store);
        if store.balance_cents < tier.monthly_cents {
            let (required, current) = (tier.monthly_cents, store.balance_cents);
            return Err(ApiError(
                StatusCode::PAYMENT_REQUIRED,
                json!({
                    "error": "INSUFFICIENT_CREDITS",
                    "message": format!("INSUFFICIENT_CREDITS: this sandbox needs {required} cents, the balance is {current}"),
                    "details": { "required_cents": required, "current_balance_cents": current },
                }),
            ));
        }
        std::fs::create_dir_all(inner.sandbox_dir(&id))
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        store.balance_cents -= tier.monthly_cents;
        let record = SandboxRecord {
            id: id.clone(),
            name: req.name.unwrap_or_else(|| id.clone()),
            region: req.region.unwrap_or_else(|| "lab".into()),
            vcpu: tier.vcpu,
            memory_mb: tier.memory_mb,
            disk_gb: tier.disk_gb,
            monthly_cents: tier.monthly_cents,
            created_at: Utc::now(),
        };
        store.sandboxes.insert(id, record.clone());
        inner.save(&store);
        record
    };
    Ok(Json(inner.sandbox_json(&record)))
}

async fn list_sandboxes(State(inner): State<Arc<Inner>>) -> Json<Value> {
    let list: Vec<Value> = {
        let records: Vec<SandboxRecord> = lock(&inner.store).sandboxes.values().cloned().collect();
        records.iter().map(|s| inner.sandbox_json(s)).collect()
    };
    if lock(&inner.faults).list_object {
        Json(json!({ "sandboxes": list }))
    } else {
        Json(Value::Array(list))
    }
}

async fn delete_sandbox(State(inner): State<Arc<Inner>>, UrlPath(id): UrlPath<String>) -> ApiError {
    if let Err(e) = sandbox(&inner, &id) {
        return e;
    }
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "Sandbox deletion is not supported: sandboxes are prepaid and non-refundable",
    )
}

#[derive(Deserialize)]
struct ExecRequest {
    command: String,
    /// Milliseconds.
    #[serde(default)]
    timeout: Option<u64>,
}

/// Runs a command; the same `Idempotency-Key` gives the same result without running it again (a retry waits for
/// the first attempt if it is still running).
async fn exec(
    State(inner): State<Arc<Inner>>,
    UrlPath(id): UrlPath<String>,
    headers: HeaderMap,
    payload: Result<Json<ExecRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let record = sandbox(&inner, &id)?;
    let req = body(payload)?;
    let timeout = Duration::from_millis(req.timeout.unwrap_or(30_000).clamp(1, 3_600_000));
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(|k| format!("exec/{}/{k}", record.id));
    let run = {
        let inner = Arc::clone(&inner);
        move || async move {
            let dir = inner.sandbox_dir(&record.id);
            let id = record.id.clone();
            let command = req.command.clone();
            let outcome =
                tokio::task::spawn_blocking(move || sandbox::exec(&id, &dir, &command, timeout))
                    .await;
            let exit_key = if inner.alt() { "exitCode" } else { "exit_code" };
            match outcome {
                Ok(Ok(o)) => (
                    StatusCode::OK,
                    json!({
                        "stdout": o.stdout,
                        "stderr": o.stderr,
                        exit_key: o.exit_code,
                        "timed_out": o.timed_out,
                    }),
                ),
                Ok(Err(e)) => (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    json!({ "error": format!("could not run the command: {e}") }),
                ),
                Err(e) => (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    json!({ "error": format!("the command runner failed: {e}") }),
                ),
            }
        }
    };
    let (status, value) = match key {
        Some(key) => {
            let cell = lock(&inner.replays).cell(key);
            cell.get_or_init(run).await.clone()
        }
        None => run().await,
    };
    Ok((status, Json(value)))
}

#[derive(Deserialize)]
struct Upload {
    path: String,
    content: String,
}

fn outside(dir: &Path, path: &str) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        format!(
            "path {path} is outside the sandbox: use a relative path or one under {}",
            dir.display()
        ),
    )
}

async fn upload(
    State(inner): State<Arc<Inner>>,
    UrlPath(id): UrlPath<String>,
    payload: Result<Json<Upload>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let record = sandbox(&inner, &id)?;
    let req = body(payload)?;
    let dir = inner.sandbox_dir(&record.id);
    let target = sandbox::resolve(&dir, &req.path).ok_or_else(|| outside(&dir, &req.path))?;
    let size = req.content.len();
    let written = tokio::task::spawn_blocking(move || {
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&target, req.content.as_bytes())
    })
    .await;
    match written {
        Ok(Ok(())) => Ok(Json(
            json!({ "success": true, "path": req.path, "size": size }),
        )),
        Ok(Err(e)) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("cannot write {}: {e}", req.path),
        )),
        Err(e) => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            e.to_string(),
        )),
    }
}

#[derive(Deserialize)]
struct ReadQuery {
    path: String,
}

async fn read_file(
    State(inner): State<Arc<Inner>>,
    UrlPath(id): UrlPath<String>,
    Query(q): Query<ReadQuery>,
) -> Result<Response, ApiError> {
    let record = sandbox(&inner, &id)?;
    let dir = inner.sandbox_dir(&record.id);
    let target = sandbox::resolve(&dir, &q.path).ok_or_else(|| outside(&dir, &q.path))?;
    let bytes = match tokio::task::spawn_blocking(move || std::fs::read(&target)).await {
        Ok(Ok(b)) => b,
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ApiError::not_found("File"))
        }
        Ok(Err(e)) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("cannot read {}: {e}", q.path),
            ))
        }
        Err(e) => {
            return Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                e.to_string(),
            ))
        }
    };
    if lock(&inner.faults).files_read_json {
        return Ok(Json(json!({ "content": String::from_utf8_lossy(&bytes) })).into_response());
    }
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], bytes).into_response())
}

#[derive(Deserialize)]
struct ExposeRequest {
    port: u16,
}

async fn expose(
    State(inner): State<Arc<Inner>>,
    UrlPath(id): UrlPath<String>,
    payload: Result<Json<ExposeRequest>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let record = sandbox(&inner, &id)?;
    let req = body(payload)?;
    if req.port == 0 {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "port must be 1-65535",
        ));
    }
    let key = (record.id.clone(), req.port);
    let existing = lock(&inner.exposed).get(&key).map(|e| e.public_url.clone());
    let public_url = match existing {
        Some(url) => url,
        None => {
            let proxy = sandbox::Exposed::start(req.port)
                .await
                .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
            let url = proxy.public_url.clone();
            lock(&inner.exposed).insert(key, proxy);
            url
        }
    };
    let url_key = if inner.alt() {
        "publicUrl"
    } else {
        "public_url"
    };
    Ok(Json(json!({ "port": req.port, url_key: public_url })))
}

async fn unexpose(
    State(inner): State<Arc<Inner>>,
    UrlPath((id, port)): UrlPath<(String, u16)>,
) -> Result<Json<Value>, ApiError> {
    let record = sandbox(&inner, &id)?;
    match lock(&inner.exposed).remove(&(record.id, port)) {
        Some(_) => Ok(Json(json!({ "success": true, "port": port }))),
        None => Err(ApiError::not_found("Exposed port")),
    }
}

async fn balance(State(inner): State<Arc<Inner>>) -> Json<Value> {
    let cents = lock(&inner.store).balance_cents;
    let key = if inner.alt() {
        "credits_cents"
    } else {
        "balance_cents"
    };
    Json(json!({ key: cents }))
}

async fn pricing() -> Json<Value> {
    Json(json!({ "tiers": tiers() }))
}

#[derive(Deserialize)]
struct TransferRequest {
    to_address: String,
    amount_cents: u64,
    #[serde(default)]
    note: Option<String>,
}

async fn transfer_singular(
    state: State<Arc<Inner>>,
    headers: HeaderMap,
    payload: Result<Json<TransferRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    if lock(&state.0.faults).transfer_plural {
        return Err(ApiError::not_found("Route"));
    }
    transfer(state, headers, payload).await
}

async fn transfer_plural(
    state: State<Arc<Inner>>,
    headers: HeaderMap,
    payload: Result<Json<TransferRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    if !lock(&state.0.faults).transfer_plural {
        return Err(ApiError::not_found("Route"));
    }
    transfer(state, headers, payload).await
}

/// Moves credits to an EVM address. The same `Idempotency-Key` answers the same without a second debit.
async fn transfer(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    payload: Result<Json<TransferRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let req = body(payload)?;
    let to = req.to_address.trim().to_string();
    let valid =
        to.len() == 42 && to.starts_with("0x") && to[2..].chars().all(|c| c.is_ascii_hexdigit());
    if !valid {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "to_address must be a 0x-prefixed EVM address",
        ));
    }
    if req.amount_cents == 0 {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "amount_cents must be positive",
        ));
    }
    let run = || async {
        let mut store = lock(&inner.store);
        if store.balance_cents < req.amount_cents {
            let current = store.balance_cents;
            return (
                StatusCode::PAYMENT_REQUIRED,
                json!({
                    "error": "INSUFFICIENT_CREDITS",
                    "details": { "required_cents": req.amount_cents, "current_balance_cents": current },
                }),
            );
        }
        store.balance_cents -= req.amount_cents;
        let id = format!("tr_{}", random_hex(8));
        let after = store.balance_cents;
        store.transfers.push(json!({
            "id": id, "to_address": to, "amount_cents": req.amount_cents, "note": req.note,
            "created_at": Utc::now(),
        }));
        inner.save(&store);
        let value = if lock(&inner.faults).alt_fields {
            json!({ "id": id, "status": "submitted", "amount_cents": req.amount_cents, "new_balance_cents": after })
        } else {
            json!({ "transfer_id": id, "status": "submitted", "amount_cents": req.amount_cents, "balance_after_cents": after })
        };
        (StatusCode::OK, value)
    };
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(|k| format!("transfer/{k}"));
    let (status, value) = match key {
        Some(key) => {
            let cell = lock(&inner.replays).cell(key);
            cell.get_or_init(run).await.clone()
        }
        None => run().await,
    };
    Ok((status, Json(value)))
}

// ---- control ----

/// Control-API bodies: malformed or unknown fields are a 400 `{"error", "kind": "bad_request"}`, as on the rest of
/// the control API.
fn control_body<T>(payload: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    payload.map(|Json(v)| v).map_err(|e| {
        ApiError(
            StatusCode::BAD_REQUEST,
            json!({ "error": e.body_text(), "kind": "bad_request" }),
        )
    })
}

async fn control_overview(State(inner): State<Arc<Inner>>) -> Json<Value> {
    let store = lock(&inner.store).clone();
    let sandboxes: Vec<Value> = store
        .sandboxes
        .values()
        .map(|s| {
            let mut v = inner.sandbox_json(s);
            v["dir"] = json!(inner.sandbox_dir(&s.id));
            v["monthly_cents"] = json!(s.monthly_cents);
            v
        })
        .collect();
    let exposed: Vec<Value> = lock(&inner.exposed)
        .iter()
        .map(|((id, port), e)| json!({ "sandbox": id, "port": port, "public_url": e.public_url }))
        .collect();
    Json(json!({
        "balance_cents": store.balance_cents,
        "sandboxes": sandboxes,
        "exposed": exposed,
        "transfers": store.transfers,
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetCredits {
    balance_cents: u64,
}

async fn control_credits(
    State(inner): State<Arc<Inner>>,
    payload: Result<Json<SetCredits>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let req = control_body(payload)?;
    let mut store = lock(&inner.store);
    store.balance_cents = req.balance_cents;
    inner.save(&store);
    Ok(Json(json!({ "balance_cents": store.balance_cents })))
}

async fn get_faults(State(inner): State<Arc<Inner>>) -> Json<Faults> {
    Json(lock(&inner.faults).clone())
}

async fn set_faults(
    State(inner): State<Arc<Inner>>,
    payload: Result<Json<Faults>, JsonRejection>,
) -> Result<Json<Faults>, ApiError> {
    let faults = control_body(payload)?;
    if faults
        .error_status
        .is_some_and(|s| !(400..=599).contains(&s))
    {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            json!({ "error": "error_status must be a 4xx or 5xx status", "kind": "bad_request" }),
        ));
    }
    *lock(&inner.faults) = faults.clone();
    Ok(Json(faults))
}
