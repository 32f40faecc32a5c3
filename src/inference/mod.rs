//! Inference: the `InferenceProvider` trait, the provider-neutral conversation types, error classification and
//! the retry loop that owns backoff, `Retry-After` and deadlines.
//!
//! Backends (`openai.rs`, `anthropic.rs`) make exactly one HTTP attempt per `complete` call over our own reqwest
//! client; everything about retrying lives here so that a 402 (paid inference, later issue) and a 429 are seen by
//! the runtime instead of being swallowed by a library's hidden retry loop.

pub mod anthropic;
pub mod openai;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::config::keys::ConfigKey;
use crate::config::{InferenceConfig, InferenceKind, Price, Secret};

/// A tool the model may call: name, description and the JSON schema of its arguments.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ToolSpec {
    pub name: String,
    pub description: String,
    pub parameters: serde_json::Value,
}

/// One tool call requested by the model. `arguments` is the raw JSON text the model produced: it is validated by
/// the tool registry, never trusted here.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    pub arguments: String,
}

/// One message of the conversation, independent of any backend's wire format.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "role", rename_all = "snake_case")]
pub enum Message {
    User {
        content: String,
    },
    Assistant {
        content: Option<String>,
        tool_calls: Vec<ToolCall>,
    },
    Tool {
        tool_call_id: String,
        name: String,
        content: String,
        is_error: bool,
    },
}

/// Everything one completion needs. The system prompt is separate because Anthropic takes it outside `messages`.
#[derive(Clone, Debug, PartialEq)]
pub struct ChatRequest {
    pub system: String,
    pub messages: Vec<Message>,
    pub tools: Vec<ToolSpec>,
    pub max_tokens: u32,
}

/// Token usage reported by the provider (zero when the provider does not say).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
}

/// Why the model stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// A natural end (text answer).
    Stop,
    /// The model asked for tool calls.
    ToolCalls,
    /// `max_tokens` was reached.
    Length,
    /// Anything else the provider reported (content filter, …).
    Other,
}

/// The model's answer to one request.
#[derive(Clone, Debug, PartialEq)]
pub struct Completion {
    pub text: Option<String>,
    pub tool_calls: Vec<ToolCall>,
    pub usage: Usage,
    pub stop_reason: StopReason,
    /// The model that answered, as the provider reported it (may differ from the configured alias).
    pub model: String,
}

/// Classified inference failures. Callers branch on these: the retry loop on `is_retryable`, the agent on
/// `ContextTooLong` (shrink the context) and, in a later issue, the wallet on `PaymentRequired`.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum InferenceError {
    #[error("rate limited by the inference provider{}: {message}", fmt_retry_after(.retry_after))]
    RateLimited {
        retry_after: Option<Duration>,
        message: String,
    },
    #[error("the conversation is too long for the model: {message}")]
    ContextTooLong { message: String },
    #[error("the inference provider refused the credentials (HTTP {status}): {message}")]
    Auth { status: u16, message: String },
    #[error("the inference provider asks for payment: {message}")]
    PaymentRequired {
        /// The `WWW-Authenticate` header (an L402 challenge for paid endpoints), if any.
        challenge: Option<String>,
        message: String,
    },
    #[error("the inference provider rejected the request (HTTP {status}): {message}")]
    BadRequest { status: u16, message: String },
    #[error("could not reach the inference provider: {0}")]
    Network(String),
    #[error("the inference provider failed (HTTP {status}): {message}")]
    Server { status: u16, message: String },
    #[error("the inference provider did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the inference provider sent an answer we cannot read: {0}")]
    BadResponse(String),
    #[error("inference is misconfigured: {0}")]
    Config(String),
    #[error("inference was cancelled")]
    Cancelled,
}

fn fmt_retry_after(retry_after: &Option<Duration>) -> String {
    match retry_after {
        Some(d) => format!(" (retry after {}s)", d.as_secs_f64()),
        None => String::new(),
    }
}

impl InferenceError {
    /// Whether trying the same request again may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            InferenceError::RateLimited { .. }
                | InferenceError::Network(_)
                | InferenceError::Server { .. }
                | InferenceError::Timeout(_)
        )
    }

    /// A short stable label for the `inference_calls.error` column and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            InferenceError::RateLimited { .. } => "rate_limited",
            InferenceError::ContextTooLong { .. } => "context_too_long",
            InferenceError::Auth { .. } => "auth",
            InferenceError::PaymentRequired { .. } => "payment_required",
            InferenceError::BadRequest { .. } => "bad_request",
            InferenceError::Network(_) => "network",
            InferenceError::Server { .. } => "server",
            InferenceError::Timeout(_) => "timeout",
            InferenceError::BadResponse(_) => "bad_response",
            InferenceError::Config(_) => "config",
            InferenceError::Cancelled => "cancelled",
        }
    }
}

/// A model backend. One required method: make one attempt at a completion. Retries, deadlines and recording are
/// the caller's (`complete_with_retry`), so every backend behaves the same under failure.
#[async_trait]
pub trait InferenceProvider: Send + Sync {
    async fn complete(&self, request: &ChatRequest) -> Result<Completion, InferenceError>;
}

/// An HTTP transport that pays for calls itself (`inference.auth: l402`: the L402 buyer). The OpenAI backend
/// sends its POSTs through it instead of plain HTTP; what comes back is classified as usual.
#[async_trait]
pub trait PaidHttp: Send + Sync {
    async fn post(
        &self,
        url: &str,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<PaidHttpResponse, InferenceError>;
}

/// The answer of a `PaidHttp` POST.
#[derive(Clone, Debug)]
pub struct PaidHttpResponse {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Vec<u8>,
    /// Paid for this call (0 when a cached credential was accepted).
    pub paid_msat: u64,
}

/// Description of one inference backend for the setup wizard.
#[derive(Clone, Debug)]
pub struct BackendInfo {
    /// The value of `inference.provider`.
    pub kind: &'static str,
    pub label: &'static str,
    pub default_base_url: &'static str,
    pub default_model: &'static str,
    pub keys: &'static [ConfigKey],
}

/// Every inference backend this binary can talk to.
pub fn backends() -> Vec<BackendInfo> {
    vec![
        BackendInfo {
            kind: "openai",
            label: "OpenAI-compatible (OpenAI, OpenRouter, ollama, llama.cpp, a lab or Conway endpoint)",
            default_base_url: openai::DEFAULT_BASE_URL,
            default_model: openai::DEFAULT_MODEL,
            keys: openai::config_keys(),
        },
        BackendInfo {
            kind: "anthropic",
            label: "Anthropic Messages API",
            default_base_url: anthropic::DEFAULT_BASE_URL,
            default_model: anthropic::DEFAULT_MODEL,
            keys: anthropic::config_keys(),
        },
    ]
}

/// Builds the configured backend. The key is handed over here and kept only inside the backend.
pub fn provider_from_config(
    config: &InferenceConfig,
    key: Option<Secret>,
) -> Result<Arc<dyn InferenceProvider>, InferenceError> {
    provider_with_payer(config, key, None)
}

/// `provider_from_config` whose calls go through `payer` (paid inference, `inference.auth: l402`).
pub fn provider_with_payer(
    config: &InferenceConfig,
    key: Option<Secret>,
    payer: Option<Arc<dyn PaidHttp>>,
) -> Result<Arc<dyn InferenceProvider>, InferenceError> {
    let timeout = Duration::from_secs(config.timeout_secs.max(1));
    if payer.is_some() && config.provider != InferenceKind::OpenAi {
        return Err(InferenceError::Config(format!(
            "inference.auth: l402 works with OpenAI-compatible endpoints, not {}",
            config.provider
        )));
    }
    let provider: Arc<dyn InferenceProvider> = match config.provider {
        InferenceKind::OpenAi => Arc::new(
            openai::OpenAiProvider::new(&config.base_url, &config.model, key, timeout)?
                .with_payer(payer),
        ),
        InferenceKind::Anthropic => Arc::new(anthropic::AnthropicProvider::new(
            &config.base_url,
            &config.model,
            key,
            timeout,
        )?),
    };
    Ok(provider)
}

/// How hard to try before giving up on one completion.
#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    /// Retries after the first attempt.
    pub max_retries: u32,
    /// First backoff; doubles per retry, with jitter.
    pub base_delay: Duration,
    /// Longest single backoff we choose ourselves (a server's `Retry-After` may ask for more, up to the deadline).
    pub max_delay: Duration,
    /// Total time budget for all attempts and waits together.
    pub deadline: Duration,
}

impl RetryPolicy {
    pub fn from_config(config: &InferenceConfig) -> RetryPolicy {
        RetryPolicy {
            max_retries: config.max_retries,
            base_delay: Duration::from_millis(config.retry_base_ms),
            max_delay: Duration::from_millis(config.retry_max_ms.max(config.retry_base_ms)),
            deadline: Duration::from_secs(config.deadline_secs),
        }
    }

    /// Backoff before retry number `retry` (0-based): exponential, capped, with "equal jitter" so a fleet of
    /// agents behind one endpoint does not retry in lockstep.
    pub fn backoff(&self, retry: u32) -> Duration {
        let exp = self
            .base_delay
            .saturating_mul(2u32.saturating_pow(retry.min(20)))
            .min(self.max_delay);
        let half = exp / 2;
        let jitter = rand::thread_rng().gen_range(0.0..=1.0f64);
        half + half.mul_f64(jitter)
    }
}

/// The outcome of one logical completion, with what it cost to get there; the agent writes it to `inference_calls`.
#[derive(Debug)]
pub struct CallRecord {
    pub result: Result<Completion, InferenceError>,
    pub attempts: u32,
    pub duration: Duration,
}

/// Runs `complete` until it succeeds, fails for good, runs out of retries or out of time, or is cancelled.
///
/// `Retry-After` is honoured as given (never shortened); a wait that would overrun the deadline ends the call with
/// the last error instead, so the agent can sleep rather than hang.
pub async fn complete_with_retry(
    provider: &dyn InferenceProvider,
    request: &ChatRequest,
    policy: &RetryPolicy,
    cancel: &CancellationToken,
) -> CallRecord {
    let started = Instant::now();
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        // No attempt may run past the deadline, whatever the backend's own timeout says.
        let remaining = policy.deadline.saturating_sub(started.elapsed());
        let result = tokio::select! {
            r = tokio::time::timeout(remaining, provider.complete(request)) => {
                r.unwrap_or(Err(InferenceError::Timeout(remaining)))
            }
            _ = cancel.cancelled() => Err(InferenceError::Cancelled),
        };
        let err = match result {
            Ok(completion) => {
                return CallRecord {
                    result: Ok(completion),
                    attempts,
                    duration: started.elapsed(),
                }
            }
            Err(e) => e,
        };
        let retries_done = attempts - 1;
        if !err.is_retryable() || retries_done >= policy.max_retries {
            return CallRecord {
                result: Err(err),
                attempts,
                duration: started.elapsed(),
            };
        }
        let wait = match &err {
            InferenceError::RateLimited {
                retry_after: Some(after),
                ..
            } => *after,
            _ => policy.backoff(retries_done),
        };
        if started.elapsed() + wait > policy.deadline {
            tracing::warn!(error = %err, wait_ms = wait.as_millis() as u64, "inference retry would pass the deadline; giving up");
            return CallRecord {
                result: Err(err),
                attempts,
                duration: started.elapsed(),
            };
        }
        tracing::warn!(error = %err, attempt = attempts, wait_ms = wait.as_millis() as u64, "inference attempt failed; retrying");
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = cancel.cancelled() => {
                return CallRecord { result: Err(InferenceError::Cancelled), attempts, duration: started.elapsed() };
            }
        }
    }
}

/// Cost of a call in sats (rounded up: a call is never free when a price is set), when a price is configured.
pub fn cost_sats(price: Option<&Price>, usage: Usage) -> Option<i64> {
    let price = price?;
    let msat = u128::from(usage.prompt_tokens) * u128::from(price.input_msat_per_1k_tokens)
        + u128::from(usage.completion_tokens) * u128::from(price.output_msat_per_1k_tokens);
    // msat_per_1k * tokens / 1000 = msat; / 1000 again = sats.
    let sats = msat.div_ceil(1_000_000);
    Some(i64::try_from(sats).unwrap_or(i64::MAX))
}

/// Parses a `Retry-After` header: delta-seconds or an HTTP date. Also accepts `retry-after-ms` (OpenAI).
pub(crate) fn parse_retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    if let Some(ms) = headers
        .get("retry-after-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|v| v.is_finite() && *v >= 0.0)
    {
        return Some(Duration::from_secs_f64(ms / 1000.0));
    }
    let value = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(secs) = value.parse::<f64>() {
        if secs.is_finite() && secs >= 0.0 {
            return Some(Duration::from_secs_f64(secs));
        }
        return None;
    }
    let when = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    let delta = when.with_timezone(&chrono::Utc) - chrono::Utc::now();
    Some(delta.to_std().unwrap_or(Duration::ZERO))
}

/// Largest response body we read from an inference endpoint; anything bigger is a broken or hostile server.
pub(crate) const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;

/// Reads a response body, refusing to buffer more than `MAX_RESPONSE_BYTES`.
pub(crate) async fn read_body(
    mut response: reqwest::Response,
    timeout: Duration,
) -> Result<String, InferenceError> {
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| classify_transport(e, timeout))?
    {
        if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
            return Err(InferenceError::BadResponse(format!(
                "the answer is larger than {MAX_RESPONSE_BYTES} bytes"
            )));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// Error text from a provider, cut to a length that fits a log line and a DB column.
pub(crate) fn clip_message(text: &str) -> String {
    const MAX: usize = 500;
    let text = text.trim();
    if text.len() <= MAX {
        return text.to_string();
    }
    let mut end = MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// Maps a transport failure of reqwest to our classes.
pub(crate) fn classify_transport(err: reqwest::Error, timeout: Duration) -> InferenceError {
    if err.is_timeout() {
        InferenceError::Timeout(timeout)
    } else if err.is_decode() {
        InferenceError::BadResponse(clip_message(&err.to_string()))
    } else {
        // Strip the URL's query (never holds secrets for us, but keep logs short) and report the cause chain.
        let mut causes = String::new();
        let mut source = std::error::Error::source(&err);
        while let Some(s) = source {
            causes.push_str(": ");
            causes.push_str(&s.to_string());
            source = s.source();
        }
        let msg = format!("{}{causes}", err.without_url());
        InferenceError::Network(clip_message(&msg))
    }
}

/// Classifies a non-success HTTP status into our error classes. `message` is the provider's error text,
/// `code` its machine-readable code/type when it has one.
pub(crate) fn classify_status(
    status: u16,
    headers: &reqwest::header::HeaderMap,
    code: Option<&str>,
    message: &str,
) -> InferenceError {
    let message = clip_message(message);
    let lower = message.to_ascii_lowercase();
    let code = code.unwrap_or("");
    let too_long = code == "context_length_exceeded"
        || lower.contains("context length")
        || lower.contains("context_length")
        || lower.contains("maximum context")
        || lower.contains("prompt is too long")
        || lower.contains("too many tokens");
    match status {
        402 => InferenceError::PaymentRequired {
            challenge: headers
                .get(reqwest::header::WWW_AUTHENTICATE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
            message,
        },
        // OpenAI signals an exhausted account with 429 too; waiting does not fix that.
        429 if code == "insufficient_quota" => InferenceError::PaymentRequired {
            challenge: None,
            message,
        },
        429 => InferenceError::RateLimited {
            retry_after: parse_retry_after(headers),
            message,
        },
        401 | 403 => InferenceError::Auth { status, message },
        413 => InferenceError::ContextTooLong { message },
        400 | 422 if too_long => InferenceError::ContextTooLong { message },
        408 => InferenceError::Timeout(Duration::ZERO),
        // 529 is Anthropic's "overloaded".
        500..=599 => InferenceError::Server { status, message },
        _ => InferenceError::BadRequest { status, message },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::{HeaderMap, HeaderValue};

    #[test]
    fn retry_after_seconds_and_dates() {
        let mut h = HeaderMap::new();
        h.insert("retry-after", HeaderValue::from_static("3"));
        assert_eq!(parse_retry_after(&h), Some(Duration::from_secs(3)));
        h.insert("retry-after-ms", HeaderValue::from_static("250"));
        assert_eq!(parse_retry_after(&h), Some(Duration::from_millis(250)));
        let mut h = HeaderMap::new();
        h.insert(
            "retry-after",
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(parse_retry_after(&h), Some(Duration::ZERO));
        h.insert("retry-after", HeaderValue::from_static("soon"));
        assert_eq!(parse_retry_after(&h), None);
    }

    #[test]
    fn statuses_are_classified() {
        let mut h = HeaderMap::new();
        h.insert(
            "www-authenticate",
            HeaderValue::from_static("L402 macaroon=\"x\", invoice=\"lnbc1\""),
        );
        assert!(matches!(
            classify_status(402, &h, None, "pay"),
            InferenceError::PaymentRequired { challenge: Some(c), .. } if c.starts_with("L402")
        ));
        let none = HeaderMap::new();
        assert!(matches!(
            classify_status(429, &none, None, "slow"),
            InferenceError::RateLimited {
                retry_after: None,
                ..
            }
        ));
        assert!(matches!(
            classify_status(429, &none, Some("insufficient_quota"), "quota"),
            InferenceError::PaymentRequired { .. }
        ));
        assert!(matches!(
            classify_status(401, &none, None, "no"),
            InferenceError::Auth { .. }
        ));
        assert!(matches!(
            classify_status(400, &none, Some("context_length_exceeded"), "too long"),
            InferenceError::ContextTooLong { .. }
        ));
        assert!(matches!(
            classify_status(400, &none, None, "prompt is too long: 300000 tokens"),
            InferenceError::ContextTooLong { .. }
        ));
        assert!(matches!(
            classify_status(400, &none, None, "bad"),
            InferenceError::BadRequest { .. }
        ));
        assert!(matches!(
            classify_status(529, &none, None, "overloaded"),
            InferenceError::Server { status: 529, .. }
        ));
        assert!(classify_status(503, &none, None, "x").is_retryable());
        assert!(!classify_status(401, &none, None, "x").is_retryable());
    }

    #[test]
    fn cost_rounds_up_and_needs_a_price() {
        let usage = Usage {
            prompt_tokens: 1000,
            completion_tokens: 500,
        };
        assert_eq!(cost_sats(None, usage), None);
        let price = Price {
            input_msat_per_1k_tokens: 1500,
            output_msat_per_1k_tokens: 3000,
        };
        // 1000*1500/1000 + 500*3000/1000 = 1500 + 1500 = 3000 msat = 3 sats.
        assert_eq!(cost_sats(Some(&price), usage), Some(3));
        let tiny = Usage {
            prompt_tokens: 1,
            completion_tokens: 0,
        };
        assert_eq!(cost_sats(Some(&price), tiny), Some(1));
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let p = RetryPolicy {
            max_retries: 5,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(400),
            deadline: Duration::from_secs(10),
        };
        for _ in 0..50 {
            let d0 = p.backoff(0);
            assert!(d0 >= Duration::from_millis(50) && d0 <= Duration::from_millis(100));
            let d5 = p.backoff(5);
            assert!(d5 >= Duration::from_millis(200) && d5 <= Duration::from_millis(400));
        }
    }

    struct Flaky {
        failures: std::sync::Mutex<Vec<InferenceError>>,
    }

    #[async_trait]
    impl InferenceProvider for Flaky {
        async fn complete(&self, _request: &ChatRequest) -> Result<Completion, InferenceError> {
            let next = self.failures.lock().expect("lock").pop();
            match next {
                Some(e) => Err(e),
                None => Ok(Completion {
                    text: Some("ok".into()),
                    tool_calls: vec![],
                    usage: Usage::default(),
                    stop_reason: StopReason::Stop,
                    model: "m".into(),
                }),
            }
        }
    }

    fn request() -> ChatRequest {
        ChatRequest {
            system: "s".into(),
            messages: vec![Message::User {
                content: "hi".into(),
            }],
            tools: vec![],
            max_tokens: 10,
        }
    }

    fn fast_policy(max_retries: u32) -> RetryPolicy {
        RetryPolicy {
            max_retries,
            base_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(2),
            deadline: Duration::from_secs(5),
        }
    }

    #[tokio::test]
    async fn retries_retryable_errors_then_succeeds() {
        let provider = Flaky {
            failures: std::sync::Mutex::new(vec![
                InferenceError::Timeout(Duration::from_secs(1)),
                InferenceError::Server {
                    status: 500,
                    message: "boom".into(),
                },
            ]),
        };
        let rec = complete_with_retry(
            &provider,
            &request(),
            &fast_policy(3),
            &CancellationToken::new(),
        )
        .await;
        assert!(rec.result.is_ok());
        assert_eq!(rec.attempts, 3);
    }

    #[tokio::test]
    async fn stops_at_max_retries_and_on_permanent_errors() {
        let provider = Flaky {
            failures: std::sync::Mutex::new(vec![
                InferenceError::Network("a".into()),
                InferenceError::Network("b".into()),
                InferenceError::Network("c".into()),
            ]),
        };
        let rec = complete_with_retry(
            &provider,
            &request(),
            &fast_policy(1),
            &CancellationToken::new(),
        )
        .await;
        assert!(matches!(rec.result, Err(InferenceError::Network(_))));
        assert_eq!(rec.attempts, 2);

        let provider = Flaky {
            failures: std::sync::Mutex::new(vec![InferenceError::Auth {
                status: 401,
                message: "no".into(),
            }]),
        };
        let rec = complete_with_retry(
            &provider,
            &request(),
            &fast_policy(5),
            &CancellationToken::new(),
        )
        .await;
        assert!(matches!(rec.result, Err(InferenceError::Auth { .. })));
        assert_eq!(rec.attempts, 1);
    }

    struct Hangs;

    #[async_trait]
    impl InferenceProvider for Hangs {
        async fn complete(&self, _request: &ChatRequest) -> Result<Completion, InferenceError> {
            std::future::pending().await
        }
    }

    #[tokio::test]
    async fn no_attempt_outlives_the_deadline() {
        let policy = RetryPolicy {
            deadline: Duration::from_millis(50),
            ..fast_policy(3)
        };
        let rec = complete_with_retry(&Hangs, &request(), &policy, &CancellationToken::new()).await;
        assert!(
            matches!(rec.result, Err(InferenceError::Timeout(_))),
            "{:?}",
            rec.result
        );
    }

    #[tokio::test]
    async fn retry_after_past_the_deadline_gives_up_at_once() {
        let provider = Flaky {
            failures: std::sync::Mutex::new(vec![InferenceError::RateLimited {
                retry_after: Some(Duration::from_secs(3600)),
                message: "later".into(),
            }]),
        };
        let rec = complete_with_retry(
            &provider,
            &request(),
            &fast_policy(5),
            &CancellationToken::new(),
        )
        .await;
        assert!(matches!(
            rec.result,
            Err(InferenceError::RateLimited { .. })
        ));
        assert_eq!(rec.attempts, 1);
    }
}
