//! The Conway Cloud compute backend: an API client for the sandbox routes of `shared/specs/conway-api.md`
//! (sandbox create/list, exec, file upload/read, port expose/remove, credits balance and pricing) with the
//! deployment's quirks handled — the raw key in `Authorization`, field names that vary, 404s from a misrouting
//! load balancer retried, 429/5xx retried with backoff behind a circuit breaker, 403 never answered by running
//! anything locally — and a `ComputeProvider` on one sandbox.
//!
//! Conway credits are bought by the operator (USDC on Base); the agent cannot top them up from its Lightning
//! wallet, so this backend never creates (spends on) a sandbox by itself and never deletes one (the API has no
//! refunds and no deletion).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use super::capture::cap_text;
use super::ssh::quote;
use super::{ComputeError, ComputeProvider, ExecOutput, ExecRequest, FileContent};
use crate::config::keys::ConfigKey;
use crate::config::{Config, Secret};
use crate::home::Home;

pub const KIND: &str = "conway";

const KEYS: &[ConfigKey] = &[
    ConfigKey {
        name: "compute.conway.api_url",
        prompt: "Conway API URL",
        default: Some("https://api.conway.tech"),
        secret: false,
    },
    ConfigKey {
        name: "compute.conway.api_key_env",
        prompt: "Environment variable holding the Conway API key (cnwy_k_…)",
        default: Some("CONWAY_API_KEY"),
        secret: false,
    },
    ConfigKey {
        name: "compute.conway.sandbox_id",
        prompt: "Sandbox id (empty: the account's first running sandbox)",
        default: None,
        secret: false,
    },
    ConfigKey {
        name: "compute.exec_timeout_secs",
        prompt: "Default timeout for one command, in seconds",
        default: Some("60"),
        secret: false,
    },
];

/// The config keys the setup wizard asks for this backend.
pub fn config_keys() -> &'static [ConfigKey] {
    KEYS
}

/// How calls are retried. The defaults are the spec's; tests shorten the pauses.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    /// Retries after a 429, 500, 502, 503, 504 or a network error.
    pub max_retries: u32,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Pauses before the extra attempts after a 404 on a route that exists (not for file reads).
    pub not_found_pauses: Vec<Duration>,
    /// Consecutive retryable failures that open the circuit breaker, and for how long.
    pub breaker_threshold: u32,
    pub breaker_open_for: Duration,
    /// Time limit of one HTTP request (exec requests get the command's timeout on top).
    pub request_timeout: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_retries: 3,
            backoff_base: Duration::from_millis(1000),
            backoff_max: Duration::from_millis(30_000),
            not_found_pauses: vec![
                Duration::from_secs(1),
                Duration::from_secs(2),
                Duration::from_secs(3),
            ],
            breaker_threshold: 5,
            breaker_open_for: Duration::from_secs(60),
            request_timeout: Duration::from_secs(30),
        }
    }
}

/// A sandbox as the API describes it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Sandbox {
    pub id: String,
    pub status: String,
    pub region: Option<String>,
    pub vcpu: Option<u64>,
    pub memory_mb: Option<u64>,
    pub disk_gb: Option<u64>,
    pub terminal_url: Option<String>,
    pub created_at: Option<String>,
}

impl Sandbox {
    /// Whether commands can run in it.
    pub fn is_usable(&self) -> bool {
        matches!(
            self.status.to_ascii_lowercase().as_str(),
            "running" | "ready" | "active" | "started"
        )
    }
}

/// What to create.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SandboxSpec {
    pub name: String,
    pub vcpu: u32,
    pub memory_mb: u64,
    pub disk_gb: u64,
    pub region: Option<String>,
}

/// The sizes the original client chose from: the smallest with enough memory is taken.
pub const SANDBOX_SIZES: &[(u64, u32, u64)] = &[
    (512, 1, 5),
    (1024, 1, 10),
    (2048, 2, 20),
    (4096, 2, 40),
    (8192, 4, 80),
];

impl SandboxSpec {
    /// The smallest standard size with at least `memory_mb` (the largest if none is big enough).
    pub fn smallest_with(name: &str, memory_mb: u64) -> SandboxSpec {
        let (memory_mb, vcpu, disk_gb) = SANDBOX_SIZES
            .iter()
            .copied()
            .find(|(m, _, _)| *m >= memory_mb)
            .unwrap_or(SANDBOX_SIZES[SANDBOX_SIZES.len() - 1]);
        SandboxSpec {
            name: name.to_string(),
            vcpu,
            memory_mb,
            disk_gb,
            region: None,
        }
    }
}

/// The raw answer of the exec route.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteExec {
    pub stdout: String,
    pub stderr: String,
    /// −1 when the server did not say.
    pub exit_code: i64,
}

/// A pricing tier.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PricingTier {
    pub name: String,
    pub vcpu: Option<u64>,
    pub memory_mb: Option<u64>,
    pub disk_gb: Option<u64>,
    pub monthly_cents: Option<u64>,
}

#[derive(Debug, Default)]
struct Breaker {
    failures: u32,
    open_until: Option<Instant>,
}

/// Per-call options.
#[derive(Clone, Debug, Default)]
struct Call {
    idempotency_key: Option<String>,
    /// Whether a 404 is the load balancer's bug (retry) or an answer ("no such file").
    not_found_is_answer: bool,
    extra_timeout: Duration,
}

/// A Conway control-plane client.
pub struct ConwayClient {
    http: reqwest::Client,
    base: String,
    key: Secret,
    policy: RetryPolicy,
    breaker: Mutex<Breaker>,
}

impl std::fmt::Debug for ConwayClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConwayClient")
            .field("base", &self.base)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

/// Answer of a successful call.
struct Answer {
    json: Option<Value>,
    text: String,
}

impl ConwayClient {
    pub fn new(api_url: &str, key: Secret) -> Result<ConwayClient, ComputeError> {
        ConwayClient::with_policy(api_url, key, RetryPolicy::default())
    }

    pub fn with_policy(
        api_url: &str,
        key: Secret,
        policy: RetryPolicy,
    ) -> Result<ConwayClient, ComputeError> {
        if key.expose().trim().is_empty() {
            return Err(ComputeError::Config(
                "the Conway API key is empty".to_string(),
            ));
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| ComputeError::Config(format!("cannot build an HTTP client: {e}")))?;
        Ok(ConwayClient {
            http,
            base: api_url.trim_end_matches('/').to_string(),
            key,
            policy,
            breaker: Mutex::new(Breaker::default()),
        })
    }

    fn headers(&self, call: &Call) -> Result<HeaderMap, ComputeError> {
        let mut headers = HeaderMap::new();
        // The raw key, no `Bearer`: that is what Conway expects.
        let mut auth = HeaderValue::from_str(self.key.expose().trim()).map_err(|_| {
            ComputeError::Config("the Conway API key has characters a header cannot carry".into())
        })?;
        auth.set_sensitive(true);
        headers.insert(AUTHORIZATION, auth);
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(key) = &call.idempotency_key {
            if let Ok(v) = HeaderValue::from_str(key) {
                headers.insert("Idempotency-Key", v);
            }
        }
        Ok(headers)
    }

    fn breaker_check(&self) -> Result<(), ComputeError> {
        let mut b = self.breaker.lock().unwrap_or_else(|p| p.into_inner());
        match b.open_until {
            Some(until) if Instant::now() < until => Err(ComputeError::Unavailable {
                provider: KIND,
                reason: format!(
                    "{} failures in a row; calls paused for {}s",
                    self.policy.breaker_threshold,
                    until.saturating_duration_since(Instant::now()).as_secs() + 1
                ),
            }),
            Some(_) => {
                b.open_until = None;
                b.failures = 0;
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// Counts a retryable failure; true when it opened the breaker.
    fn breaker_failure(&self) -> bool {
        let mut b = self.breaker.lock().unwrap_or_else(|p| p.into_inner());
        b.failures += 1;
        if b.failures >= self.policy.breaker_threshold {
            b.open_until = Some(Instant::now() + self.policy.breaker_open_for);
            true
        } else {
            false
        }
    }

    fn breaker_reset(&self) {
        let mut b = self.breaker.lock().unwrap_or_else(|p| p.into_inner());
        b.failures = 0;
    }

    fn backoff(&self, attempt: u32) -> Duration {
        use rand::Rng;
        let factor = rand::thread_rng().gen_range(0.5..1.5);
        let ms = self.policy.backoff_base.as_millis() as f64 * 2f64.powi(attempt as i32) * factor;
        Duration::from_millis(ms as u64).min(self.policy.backoff_max)
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        call: Call,
    ) -> Result<Answer, ComputeError> {
        let url = format!("{}{}", self.base, path);
        let headers = self.headers(&call)?;
        let mut retries = 0u32;
        let mut not_found_retries = 0usize;
        loop {
            self.breaker_check()?;
            let mut request = self
                .http
                .request(method.clone(), &url)
                .headers(headers.clone())
                .timeout(self.policy.request_timeout + call.extra_timeout);
            if let Some(body) = body {
                request = request.body(body.to_string());
            }
            let failure = match request.send().await {
                Err(e) => format!("network error: {}", without_url(&e)),
                Ok(response) => {
                    let status = response.status();
                    let retry_after = response
                        .headers()
                        .get(reqwest::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .map(Duration::from_secs);
                    let is_json = response
                        .headers()
                        .get(CONTENT_TYPE)
                        .and_then(|v| v.to_str().ok())
                        .is_some_and(|v| v.contains("application/json"));
                    let text = match response.text().await {
                        Ok(t) => t,
                        Err(e) => {
                            let failure = format!("network error: {}", without_url(&e));
                            self.retry_or_fail(&mut retries, &failure, None).await?;
                            continue;
                        }
                    };
                    let json = if is_json {
                        serde_json::from_str(&text).ok()
                    } else {
                        None
                    };
                    if status.is_success() {
                        self.breaker_reset();
                        return Ok(Answer { json, text });
                    }
                    let message = server_message(json.as_ref(), &text, status);
                    match status {
                        StatusCode::NOT_FOUND if call.not_found_is_answer => {
                            self.breaker_reset();
                            return Err(ComputeError::NotFound {
                                path: PathBuf::from(path),
                            });
                        }
                        StatusCode::NOT_FOUND
                            if not_found_retries < self.policy.not_found_pauses.len() =>
                        {
                            // Outside the breaker: the spec's load-balancer misrouting.
                            tokio::time::sleep(self.policy.not_found_pauses[not_found_retries])
                                .await;
                            not_found_retries += 1;
                            continue;
                        }
                        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                            self.breaker_reset();
                            return Err(ComputeError::Auth {
                                provider: KIND,
                                message,
                            });
                        }
                        StatusCode::PAYMENT_REQUIRED => {
                            self.breaker_reset();
                            let details = json.as_ref().and_then(|j| j.get("details"));
                            return Err(ComputeError::InsufficientCredits {
                                provider: KIND,
                                required_cents: details
                                    .and_then(|d| d.get("required_cents"))
                                    .and_then(Value::as_u64),
                                balance_cents: details
                                    .and_then(|d| d.get("current_balance_cents"))
                                    .and_then(Value::as_u64),
                            });
                        }
                        StatusCode::TOO_MANY_REQUESTS
                        | StatusCode::INTERNAL_SERVER_ERROR
                        | StatusCode::BAD_GATEWAY
                        | StatusCode::SERVICE_UNAVAILABLE
                        | StatusCode::GATEWAY_TIMEOUT => {
                            let failure = format!("{} {}", status.as_u16(), message);
                            self.retry_or_fail(&mut retries, &failure, retry_after)
                                .await?;
                            continue;
                        }
                        _ => {
                            self.breaker_reset();
                            return Err(ComputeError::Remote {
                                provider: KIND,
                                message: format!(
                                    "{} {path}: {} {message}",
                                    method,
                                    status.as_u16()
                                ),
                            });
                        }
                    }
                }
            };
            self.retry_or_fail(&mut retries, &failure, None).await?;
        }
    }

    /// After a retryable failure: counts it, and either waits for the next attempt or returns the error.
    async fn retry_or_fail(
        &self,
        retries: &mut u32,
        failure: &str,
        retry_after: Option<Duration>,
    ) -> Result<(), ComputeError> {
        if self.breaker_failure() {
            return Err(ComputeError::Unavailable {
                provider: KIND,
                reason: format!(
                    "{failure}; {} failures in a row",
                    self.policy.breaker_threshold
                ),
            });
        }
        if *retries >= self.policy.max_retries {
            return Err(ComputeError::Remote {
                provider: KIND,
                message: format!("{failure} (after {} retries)", self.policy.max_retries),
            });
        }
        let pause = retry_after
            .map(|d| d.min(self.policy.backoff_max))
            .unwrap_or_else(|| self.backoff(*retries));
        *retries += 1;
        tokio::time::sleep(pause).await;
        Ok(())
    }

    /// Creates a sandbox (spends the operator's credits: a 402 says there are not enough).
    pub async fn create_sandbox(&self, spec: &SandboxSpec) -> Result<Sandbox, ComputeError> {
        let mut body = json!({"name": spec.name, "vcpu": spec.vcpu, "memory_mb": spec.memory_mb,
                              "disk_gb": spec.disk_gb});
        if let Some(region) = &spec.region {
            body["region"] = json!(region);
        }
        let answer = self
            .call(Method::POST, "/v1/sandboxes", Some(&body), Call::default())
            .await?;
        let value = answer.json.unwrap_or(Value::Null);
        parse_sandbox(&value).ok_or_else(|| bad_answer("create sandbox", "no sandbox id"))
    }

    /// Every sandbox of the account (either answer shape).
    pub async fn list_sandboxes(&self) -> Result<Vec<Sandbox>, ComputeError> {
        let answer = self
            .call(Method::GET, "/v1/sandboxes", None, Call::default())
            .await?;
        let value = answer.json.unwrap_or(Value::Null);
        let items = value
            .as_array()
            .or_else(|| value.get("sandboxes").and_then(Value::as_array))
            .ok_or_else(|| bad_answer("list sandboxes", "no sandbox list"))?;
        Ok(items.iter().filter_map(parse_sandbox).collect())
    }

    /// Runs a shell command in a sandbox. The server's timeout is in milliseconds; one idempotency key covers
    /// the call's retries so a retried request never runs the command twice.
    pub async fn exec(
        &self,
        sandbox_id: &str,
        command: &str,
        timeout: Duration,
    ) -> Result<RemoteExec, ComputeError> {
        let body = json!({"command": command, "timeout": timeout.as_millis() as u64});
        let call = Call {
            idempotency_key: Some(ulid::Ulid::new().to_string()),
            extra_timeout: timeout,
            ..Default::default()
        };
        let answer = self
            .call(
                Method::POST,
                &format!("/v1/sandboxes/{}/exec", path_segment(sandbox_id)),
                Some(&body),
                call,
            )
            .await?;
        let value = answer.json.unwrap_or(Value::Null);
        let text = |k: &str| {
            value
                .get(k)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        Ok(RemoteExec {
            stdout: text("stdout"),
            stderr: text("stderr"),
            exit_code: value
                .get("exit_code")
                .or_else(|| value.get("exitCode"))
                .and_then(Value::as_i64)
                .unwrap_or(-1),
        })
    }

    /// Writes a UTF-8 text file in a sandbox.
    pub async fn upload_file(
        &self,
        sandbox_id: &str,
        path: &str,
        content: &str,
    ) -> Result<(), ComputeError> {
        let body = json!({"path": path, "content": content});
        self.call(
            Method::POST,
            &format!(
                "/v1/sandboxes/{}/files/upload/json",
                path_segment(sandbox_id)
            ),
            Some(&body),
            Call::default(),
        )
        .await
        .map(|_| ())
    }

    /// Reads a file in a sandbox (a text body, or `{content}`). A missing file is `NotFound`.
    pub async fn read_file(&self, sandbox_id: &str, path: &str) -> Result<String, ComputeError> {
        let call = Call {
            not_found_is_answer: true,
            ..Default::default()
        };
        let route = format!(
            "/v1/sandboxes/{}/files/read?path={}",
            path_segment(sandbox_id),
            query_value(path)
        );
        match self.call(Method::GET, &route, None, call).await {
            Ok(answer) => Ok(
                match answer
                    .json
                    .as_ref()
                    .and_then(|j| j.get("content"))
                    .and_then(Value::as_str)
                {
                    Some(content) => content.to_string(),
                    None => answer.text,
                },
            ),
            Err(ComputeError::NotFound { .. }) => Err(ComputeError::NotFound {
                path: PathBuf::from(path),
            }),
            Err(e) => Err(e),
        }
    }

    /// Makes a port of the sandbox public; returns its URL.
    pub async fn expose_port(&self, sandbox_id: &str, port: u16) -> Result<String, ComputeError> {
        let answer = self
            .call(
                Method::POST,
                &format!("/v1/sandboxes/{}/ports/expose", path_segment(sandbox_id)),
                Some(&json!({"port": port})),
                Call::default(),
            )
            .await?;
        let value = answer.json.unwrap_or(Value::Null);
        ["public_url", "publicUrl", "url"]
            .iter()
            .find_map(|k| value.get(*k).and_then(Value::as_str))
            .map(str::to_string)
            .ok_or_else(|| bad_answer("expose port", "no public URL"))
    }

    /// Takes a port out of public reach.
    pub async fn remove_port(&self, sandbox_id: &str, port: u16) -> Result<(), ComputeError> {
        self.call(
            Method::DELETE,
            &format!("/v1/sandboxes/{}/ports/{port}", path_segment(sandbox_id)),
            None,
            Call::default(),
        )
        .await
        .map(|_| ())
    }

    /// The account's credits, in US cents (missing field: 0).
    pub async fn credits_balance_cents(&self) -> Result<u64, ComputeError> {
        let answer = self
            .call(Method::GET, "/v1/credits/balance", None, Call::default())
            .await?;
        let value = answer.json.unwrap_or(Value::Null);
        Ok(value
            .get("balance_cents")
            .or_else(|| value.get("credits_cents"))
            .and_then(as_u64_lenient)
            .unwrap_or(0))
    }

    /// The sandbox price list.
    pub async fn pricing(&self) -> Result<Vec<PricingTier>, ComputeError> {
        let answer = self
            .call(Method::GET, "/v1/credits/pricing", None, Call::default())
            .await?;
        let value = answer.json.unwrap_or(Value::Null);
        let tiers = value
            .get("tiers")
            .or_else(|| value.get("pricing"))
            .and_then(Value::as_array)
            .ok_or_else(|| bad_answer("pricing", "no tiers"))?;
        Ok(tiers
            .iter()
            .map(|t| PricingTier {
                name: t
                    .get("name")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
                vcpu: t.get("vcpu").and_then(as_u64_lenient),
                memory_mb: t.get("memory_mb").and_then(as_u64_lenient),
                disk_gb: t.get("disk_gb").and_then(as_u64_lenient),
                monthly_cents: t.get("monthly_cents").and_then(as_u64_lenient),
            })
            .collect())
    }
}

fn bad_answer(what: &str, why: &str) -> ComputeError {
    ComputeError::Remote {
        provider: KIND,
        message: format!("unexpected answer to {what}: {why}"),
    }
}

/// A reqwest error without the URL (which carries nothing secret here, but is noise in a tool result).
fn without_url(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "cannot connect"
    } else {
        "request failed"
    };
    let mut text = kind.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text = format!("{text}: {s}");
        source = s.source();
    }
    text
}

/// The server's words for an error: a JSON `error`/`message`/`detail`, else the text, shortened.
fn server_message(json: Option<&Value>, text: &str, status: StatusCode) -> String {
    let from_json = json.and_then(|j| {
        ["error", "message", "detail"]
            .iter()
            .find_map(|k| match j.get(*k) {
                Some(Value::String(s)) => Some(s.clone()),
                Some(Value::Object(o)) => {
                    o.get("message").and_then(Value::as_str).map(str::to_string)
                }
                _ => None,
            })
    });
    let message = from_json.unwrap_or_else(|| text.trim().to_string());
    let message: String = message.chars().take(300).collect();
    if message.is_empty() {
        status.canonical_reason().unwrap_or("error").to_string()
    } else {
        message
    }
}

fn as_u64_lenient(v: &Value) -> Option<u64> {
    v.as_u64()
        .or_else(|| v.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
        .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
}

/// Normalises a sandbox id: blank, "undefined" and "null" mean none.
pub fn normalise_sandbox_id(id: &str) -> Option<String> {
    let id = id.trim();
    match id {
        "" | "undefined" | "null" => None,
        _ => Some(id.to_string()),
    }
}

fn parse_sandbox(v: &Value) -> Option<Sandbox> {
    let id = v
        .get("id")
        .or_else(|| v.get("sandbox_id"))
        .and_then(|id| match id {
            Value::String(s) => normalise_sandbox_id(s),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        })?;
    let text = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
    Some(Sandbox {
        id,
        status: text("status").unwrap_or_else(|| "running".to_string()),
        region: text("region"),
        vcpu: v.get("vcpu").and_then(as_u64_lenient),
        memory_mb: v.get("memory_mb").and_then(as_u64_lenient),
        disk_gb: v.get("disk_gb").and_then(as_u64_lenient),
        terminal_url: text("terminal_url"),
        created_at: text("created_at"),
    })
}

/// Percent-encodes everything but unreserved characters.
fn encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || (keep_slash && b == b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn path_segment(s: &str) -> String {
    encode(s, false)
}

fn query_value(s: &str) -> String {
    encode(s, true)
}

/// Exit statuses of the file scripts.
const ST_NOT_FOUND: i64 = 70;
const ST_IS_DIR: i64 = 71;
const ST_DENIED: i64 = 72;

/// Bytes of base64 per exec when writing a binary file (keeps each request small).
const BASE64_CHUNK: usize = 48 * 1024;
/// Time limit of file operations run through exec.
const FILE_TIMEOUT: Duration = Duration::from_secs(120);
/// Extra time the server gets past a command's own (remote) timeout, so ours fires first.
const SERVER_GRACE: Duration = Duration::from_secs(5);

/// Runs commands in one Conway sandbox.
pub struct ConwayCompute {
    client: Arc<ConwayClient>,
    configured_sandbox: Option<String>,
    sandbox: tokio::sync::OnceCell<String>,
    /// The configured workdir, or `~` until the sandbox's home is learnt.
    workdir: PathBuf,
    discovered_workdir: OnceLock<PathBuf>,
    configured_workdir: bool,
}

impl std::fmt::Debug for ConwayCompute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConwayCompute")
            .field("client", &self.client)
            .field(
                "sandbox",
                &self.sandbox.get().or(self.configured_sandbox.as_ref()),
            )
            .finish_non_exhaustive()
    }
}

impl ConwayCompute {
    /// `sandbox_id`: `None` picks the account's first usable sandbox on first use. `workdir`: `None` is the
    /// sandbox user's home.
    pub fn new(
        client: Arc<ConwayClient>,
        sandbox_id: Option<String>,
        workdir: Option<PathBuf>,
    ) -> Result<ConwayCompute, ComputeError> {
        if let Some(w) = &workdir {
            if w.is_relative() {
                return Err(ComputeError::Config(format!(
                    "the Conway working directory must be absolute, not {}",
                    w.display()
                )));
            }
        }
        Ok(ConwayCompute {
            client,
            configured_sandbox: sandbox_id.as_deref().and_then(normalise_sandbox_id),
            sandbox: tokio::sync::OnceCell::new(),
            configured_workdir: workdir.is_some(),
            workdir: workdir.unwrap_or_else(|| PathBuf::from("~")),
            discovered_workdir: OnceLock::new(),
        })
    }

    /// The provider `compute.conway.*` describes.
    pub fn from_config(home: &Home, config: &Config) -> Result<ConwayCompute, ComputeError> {
        let c = &config.compute.conway;
        let key = api_key(home, config)?;
        let client = ConwayClient::new(&c.api_url, key)?;
        ConwayCompute::new(Arc::new(client), c.sandbox_id.clone(), c.workdir.clone())
    }

    pub fn client(&self) -> &Arc<ConwayClient> {
        &self.client
    }

    /// The sandbox in use (picked on first use when not configured).
    pub async fn sandbox_id(&self) -> Result<&str, ComputeError> {
        self.sandbox
            .get_or_try_init(|| async {
                if let Some(id) = &self.configured_sandbox {
                    return Ok(id.clone());
                }
                let sandboxes = self.client.list_sandboxes().await?;
                sandboxes
                    .into_iter()
                    .find(Sandbox::is_usable)
                    .map(|s| s.id)
                    .ok_or_else(|| {
                        ComputeError::Config(
                            "this Conway account has no running sandbox; create one in Conway (it is paid from \
                             the operator's credits) and set compute.conway.sandbox_id"
                                .to_string(),
                        )
                    })
            })
            .await
            .map(String::as_str)
    }

    /// Takes a port exposed with `expose_port` out of public reach.
    pub async fn remove_port(&self, port: u16) -> Result<(), ComputeError> {
        let id = self.sandbox_id().await?;
        self.client.remove_port(id, port).await
    }

    /// Runs a script with `sh -c`, its arguments quoted, under the remote `timeout`.
    async fn run(
        &self,
        script: &str,
        args: &[&str],
        timeout: Duration,
    ) -> Result<RemoteExec, ComputeError> {
        let id = self.sandbox_id().await?;
        let mut line = format!("sh -c {} automaton", quote(script));
        for a in args {
            line.push(' ');
            line.push_str(&quote(a));
        }
        self.client.exec(id, &line, timeout + SERVER_GRACE).await
    }

    /// The working directory, learnt from the sandbox when not configured.
    async fn resolved_workdir(&self) -> Result<PathBuf, ComputeError> {
        if self.configured_workdir {
            return Ok(self.workdir.clone());
        }
        if let Some(w) = self.discovered_workdir.get() {
            return Ok(w.clone());
        }
        let out = self
            .run("printf '%s' \"$HOME\"", &[], Duration::from_secs(30))
            .await?;
        let home = out.stdout.trim();
        let dir = if home.starts_with('/') {
            PathBuf::from(home)
        } else {
            PathBuf::from("/root")
        };
        let _ = self.discovered_workdir.set(dir.clone());
        Ok(dir)
    }

    /// Absolute path in the sandbox (`~` is the workdir's home).
    async fn resolve(&self, path: &Path) -> Result<String, ComputeError> {
        let text = path.to_string_lossy();
        if text == "~" || text.starts_with("~/") {
            let home = self.resolved_workdir().await?;
            return Ok(home
                .join(text.trim_start_matches('~').trim_start_matches('/'))
                .to_string_lossy()
                .into_owned());
        }
        Ok(text.into_owned())
    }

    fn file_error(&self, op: &'static str, path: &Path, out: &RemoteExec) -> ComputeError {
        let path = path.to_path_buf();
        match out.exit_code {
            ST_NOT_FOUND => ComputeError::NotFound { path },
            ST_IS_DIR => ComputeError::IsDirectory { path },
            ST_DENIED => ComputeError::PermissionDenied { path },
            code => ComputeError::Io {
                op,
                path,
                source: std::io::Error::other(
                    out.stderr
                        .lines()
                        .rfind(|l| !l.trim().is_empty())
                        .map(str::to_string)
                        .unwrap_or_else(|| format!("remote status {code}")),
                ),
            },
        }
    }
}

/// Reads the Conway API key: the variable named by `compute.conway.api_key_env`, else the 0600 file in
/// `compute.conway.api_key_file`. Never logged.
pub fn api_key(home: &Home, config: &Config) -> Result<Secret, ComputeError> {
    let c = &config.compute.conway;
    if let Some(var) = &c.api_key_env {
        match std::env::var(var) {
            Ok(v) if !v.trim().is_empty() => return Ok(Secret::new(v.trim())),
            _ if c.api_key_file.is_none() => {
                return Err(ComputeError::Config(format!(
                    "environment variable {var} (named by compute.conway.api_key_env) is not set"
                )))
            }
            _ => {}
        }
    }
    match &c.api_key_file {
        Some(file) => {
            let file = if file.is_relative() {
                home.root().join(file)
            } else {
                file.clone()
            };
            crate::config::read_secret_file(&file).map_err(|e| ComputeError::Config(e.to_string()))
        }
        None => Err(ComputeError::Config(
            "no Conway API key: set compute.conway.api_key_env (or api_key_file)".to_string(),
        )),
    }
}

/// Enters the workdir and runs `$3` under `timeout -s KILL $2`. `$1` = workdir.
const EXEC_SCRIPT: &str = r#"w=$1
case $w in "~") w=$HOME;; "~/"*) w=$HOME/${w#"~/"};; esac
mkdir -p -- "$w" 2>/dev/null
cd -- "$w" || exit 1
timeout -s KILL "$2" sh -c "$3" </dev/null"#;

/// `$1` = path, `$2` = most bytes. Prints the size on a line, then the bytes in base64.
const READ_SCRIPT: &str = r#"p=$1
[ -e "$p" ] || exit 70
[ -d "$p" ] && exit 71
[ -r "$p" ] || exit 72
n=$(wc -c < "$p") || exit 73
printf '%s\n' $n
head -c "$2" < "$p" | base64 || exit 73"#;

/// `$1` = path, `$2` = base64 chunk, `$3` = `new` (truncate) or `append`. Symlinks at the target are refused.
const WRITE_SCRIPT: &str = r#"p=$1
mkdir -p -- "$(dirname -- "$p")" || exit 73
[ -L "$p" ] && exit 72
[ -d "$p" ] && exit 71
if [ "$3" = new ]; then : > "$p" || exit 73; fi
printf '%s' "$2" | base64 -d >> "$p" || exit 73"#;

#[async_trait]
impl ComputeProvider for ConwayCompute {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn workdir(&self) -> &Path {
        self.discovered_workdir
            .get()
            .map(PathBuf::as_path)
            .unwrap_or(&self.workdir)
    }

    fn shares_agent_filesystem(&self) -> bool {
        false
    }

    async fn exec(&self, request: ExecRequest) -> Result<ExecOutput, ComputeError> {
        let started = Instant::now();
        let workdir = self.resolved_workdir().await?;
        let secs = format!("{:.3}", request.timeout.as_secs_f64().max(0.001));
        let out = self
            .run(
                EXEC_SCRIPT,
                &[&workdir.to_string_lossy(), &secs, &request.command],
                request.timeout,
            )
            .await?;
        let elapsed = started.elapsed();
        let (exit_code, signal, timed_out) = match out.exit_code {
            s if s > 128 && s <= 128 + 64 => {
                let signal = (s - 128) as i32;
                (
                    None,
                    Some(signal),
                    signal == libc::SIGKILL && elapsed >= request.timeout,
                )
            }
            s if s < 0 => (None, None, elapsed >= request.timeout),
            s => (Some(s as i32), None, false),
        };
        let (stdout, stdout_truncated) = cap_text(&out.stdout, request.output_cap);
        let (stderr, stderr_truncated) = cap_text(&out.stderr, request.output_cap);
        Ok(ExecOutput {
            exit_code,
            signal,
            stdout,
            stderr,
            stdout_truncated,
            stderr_truncated,
            timed_out,
            duration: elapsed,
        })
    }

    async fn read_file(&self, path: &Path, max_bytes: usize) -> Result<FileContent, ComputeError> {
        use base64::Engine;
        let remote = self.resolve(path).await?;
        let max = max_bytes.to_string();
        let out = self
            .run(READ_SCRIPT, &[&remote, &max], FILE_TIMEOUT)
            .await?;
        if out.exit_code != 0 {
            return Err(self.file_error("read", path, &out));
        }
        let (size, encoded) = out
            .stdout
            .split_once('\n')
            .ok_or_else(|| bad_answer("read file", "no size"))?;
        let size = size
            .trim()
            .parse::<u64>()
            .map_err(|_| bad_answer("read file", "bad size"))?;
        let encoded: String = encoded.chars().filter(|c| !c.is_whitespace()).collect();
        let mut bytes = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .map_err(|_| bad_answer("read file", "bad base64"))?;
        bytes.truncate(max_bytes);
        Ok(FileContent { bytes, size })
    }

    async fn write_file(&self, path: &Path, content: &[u8]) -> Result<(), ComputeError> {
        use base64::Engine;
        let remote = self.resolve(path).await?;
        let encoded = base64::engine::general_purpose::STANDARD.encode(content);
        // base64 is ASCII, so byte chunks are char boundaries.
        let mut chunks: Vec<&str> = encoded
            .as_bytes()
            .chunks(BASE64_CHUNK)
            .map(|c| std::str::from_utf8(c).unwrap_or_default())
            .collect();
        if chunks.is_empty() {
            chunks.push("");
        }
        for (i, chunk) in chunks.iter().enumerate() {
            let mode = if i == 0 { "new" } else { "append" };
            let out = self
                .run(WRITE_SCRIPT, &[&remote, chunk, mode], FILE_TIMEOUT)
                .await?;
            if out.exit_code != 0 {
                return Err(self.file_error("write", path, &out));
            }
        }
        Ok(())
    }

    async fn expose_port(&self, port: u16) -> Result<String, ComputeError> {
        let id = self.sandbox_id().await?;
        self.client.expose_port(id, port).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_pick_the_smallest_that_fits() {
        assert_eq!(SandboxSpec::smallest_with("a", 100).memory_mb, 512);
        assert_eq!(SandboxSpec::smallest_with("a", 1500).memory_mb, 2048);
        assert_eq!(SandboxSpec::smallest_with("a", 99_999).memory_mb, 8192);
    }

    #[test]
    fn sandbox_ids_are_normalised_and_fields_accept_alternatives() {
        assert_eq!(normalise_sandbox_id(" undefined "), None);
        assert_eq!(normalise_sandbox_id("null"), None);
        let s = parse_sandbox(&json!({"sandbox_id": " sb-1 ", "memory_mb": "512"})).unwrap();
        assert_eq!(s.id, "sb-1");
        assert_eq!(s.status, "running");
        assert_eq!(s.memory_mb, Some(512));
        assert!(parse_sandbox(&json!({"id": ""})).is_none());
    }

    #[test]
    fn paths_are_encoded() {
        assert_eq!(query_value("/root/a b&c"), "/root/a%20b%26c");
        assert_eq!(path_segment("a/b"), "a%2Fb");
    }
}
