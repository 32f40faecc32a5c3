//! The L402 buyer: fetches a URL and, when the server answers `402` with an L402 challenge, pays for the
//! credential and asks again — safely.
//!
//! Before paying: the challenge must parse, the invoice must decode for this wallet's network, carry an amount and
//! not be expired, and its payment hash must be the one the macaroon's identifier commits to; the price must fit
//! the request's cap (`max_sats`) and the budget gate must grant a permit (one atomic reservation against every
//! cap). A refusal at any of these steps pays nothing and writes no payment receipt. The wallet then records the
//! pending receipt before sending (so an invoice is paid at most once, even across a crash), and the payment counts
//! only with a preimage whose SHA-256 is the payment hash. The credential (macaroon + preimage) is cached in the
//! state DB under the origin and the path it was bought for, until its earliest `*_valid_until` caveat; a later
//! request to that path or below sends it first, and a server that rejects it makes the buyer drop it. The
//! receipt links the URL, a hash of the request, a hash of the response and the proof of payment.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use automaton_l402 as l402;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, AUTHORIZATION, WWW_AUTHENTICATE};
use reqwest::{Method, StatusCode, Url};
use serde::Serialize;
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::inference::{InferenceError, PaidHttp, PaidHttpResponse};
use crate::money::receipts::{self, Direction, ReceiptStatus};
use crate::money::{BudgetError, Rail, SpendRequest};
use crate::state::Db;
use crate::wallet::spend::{self, ApprovalWait};
use crate::wallet::{Wallet, WalletError};

/// The cap of one purchase when the caller names none, in sats (lnget's default `--max-cost`).
pub const DEFAULT_MAX_SATS: u64 = 1_000;
/// How long paid inference waits for a node that is still starting.
const READY_WAIT: Duration = Duration::from_secs(60);
/// Default timeout of one HTTP exchange.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest response body read (a paid API answer, a model completion).
const MAX_BODY: usize = 16 * 1024 * 1024;

/// Why a fetch failed. `exit_code` follows CONVENTIONS.md: 2 refused before paying, 3 a payment was attempted and
/// failed (or was made and the server still refused), else 1.
#[derive(Debug, thiserror::Error)]
pub enum L402Error {
    #[error("{0}")]
    BadRequest(String),
    #[error("cannot reach {url}: {reason}")]
    Http { url: String, reason: String },
    /// The 402 carried no usable challenge (or a hostile one): nothing was paid.
    #[error("refused to pay: the 402 from {url} carries no usable L402 challenge ({reason})")]
    BadChallenge { url: String, reason: String },
    /// The price is above this request's cap: nothing was paid.
    #[error("refused to pay: {url} asks {price_msat} msat, more than the cap of {max_sats} sats")]
    OverCap {
        url: String,
        price_msat: u64,
        max_sats: u64,
    },
    /// The budget gate said no: nothing was paid.
    #[error("refused by the budget (nothing was paid): {0}")]
    Budget(BudgetError),
    /// The wallet could not or would not pay (node not ready, payment failed).
    #[error(transparent)]
    Wallet(WalletError),
    /// Paid, but the server still answers 402 with the credential it sold.
    #[error("paid {paid_msat} msat (payment hash {payment_hash}) but {url} still refuses the credential")]
    RejectedAfterPayment {
        url: String,
        payment_hash: String,
        paid_msat: u64,
    },
    #[error(transparent)]
    Money(#[from] crate::money::MoneyError),
    #[error(transparent)]
    State(#[from] crate::state::StateError),
}

impl L402Error {
    pub fn exit_code(&self) -> u8 {
        match self {
            L402Error::BadChallenge { .. } | L402Error::OverCap { .. } => 2,
            L402Error::Budget(b) => b.exit_code(),
            L402Error::Wallet(w) => w.exit_code(),
            L402Error::RejectedAfterPayment { .. } => 3,
            _ => 1,
        }
    }

    /// Refused by policy before anything was paid.
    pub fn is_refusal(&self) -> bool {
        self.exit_code() == 2
    }

    pub fn kind(&self) -> &'static str {
        match self {
            L402Error::BadRequest(_) => "bad_request",
            L402Error::Http { .. } => "http",
            L402Error::BadChallenge { .. } => "bad_challenge",
            L402Error::OverCap { .. } => "over_cap",
            L402Error::Budget(b) => b.kind(),
            L402Error::Wallet(w) => w.kind(),
            L402Error::RejectedAfterPayment { .. } => "rejected_after_payment",
            L402Error::Money(_) => "money",
            L402Error::State(_) => "state",
        }
    }
}

impl From<WalletError> for L402Error {
    fn from(e: WalletError) -> Self {
        match e {
            WalletError::Budget(b) => L402Error::Budget(b),
            other => L402Error::Wallet(other),
        }
    }
}

/// One request to make.
#[derive(Clone, Debug)]
pub struct FetchRequest {
    pub url: String,
    pub method: String,
    pub headers: Vec<(String, String)>,
    pub body: Option<Vec<u8>>,
    /// The most this request may pay for a credential, in sats (routing fee aside).
    pub max_sats: u64,
    /// Why the money is spent (kept on the permit and receipt); `inference` counts against the inference cap.
    pub purpose: Option<String>,
    pub timeout: Option<Duration>,
}

impl FetchRequest {
    pub fn get(url: impl Into<String>, max_sats: u64) -> FetchRequest {
        FetchRequest {
            url: url.into(),
            method: "GET".into(),
            headers: Vec::new(),
            body: None,
            max_sats,
            purpose: None,
            timeout: None,
        }
    }
}

/// What came back.
#[derive(Clone, Debug)]
pub struct FetchResponse {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
    /// Paid for this request (0 when nothing was bought).
    pub paid_msat: u64,
    pub fee_msat: u64,
    pub payment_hash: Option<String>,
    /// A cached credential was sent and accepted.
    pub from_cache: bool,
    pub receipt_id: Option<String>,
}

impl FetchResponse {
    pub fn content_type(&self) -> Option<&str> {
        self.headers
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
    }

    /// The CLI's and tool's JSON shape: `{status, paid_msat, fee_msat, payment_hash, from_cache, body}`, with `body`
    /// parsed when the response is JSON (else text).
    pub fn summary(&self) -> serde_json::Value {
        json!({
            "status": self.status,
            "paid_msat": self.paid_msat,
            "fee_msat": self.fee_msat,
            "payment_hash": self.payment_hash,
            "from_cache": self.from_cache,
            "body": self.body_value(),
        })
    }

    /// The body as JSON when it is JSON, else as (lossy) text.
    pub fn body_value(&self) -> serde_json::Value {
        let is_json = self
            .content_type()
            .is_some_and(|t| t.to_ascii_lowercase().contains("json"));
        if is_json {
            if let Ok(value) = serde_json::from_slice(&self.body) {
                return value;
            }
        }
        serde_json::Value::String(String::from_utf8_lossy(&self.body).into_owned())
    }
}

/// A cached credential.
#[derive(Clone)]
struct CachedToken {
    origin: String,
    path_prefix: String,
    token: String,
    preimage: [u8; 32],
}

/// The buyer. Cheap to clone.
#[derive(Clone, Debug)]
pub struct L402Client {
    wallet: Wallet,
    http: reqwest::Client,
}

/// `scheme://host:port` of a URL (the port always written, so `https://a` and `https://a:443` are one origin).
pub fn origin_of(url: &Url) -> String {
    format!(
        "{}://{}:{}",
        url.scheme(),
        url.host_str().unwrap_or_default().to_ascii_lowercase(),
        url.port_or_known_default().unwrap_or(0)
    )
}

/// Whether a credential bought for `prefix` covers `path`: the same path or one below it.
pub fn path_covers(prefix: &str, path: &str) -> bool {
    if prefix == "/" || prefix == path {
        return true;
    }
    let trimmed = prefix.trim_end_matches('/');
    path.strip_prefix(trimmed)
        .is_some_and(|rest| rest.starts_with('/'))
}

/// SHA-256 over `METHOD SP URL LF body`: what the receipt's `request_hash` commits to.
pub fn request_hash(method: &str, url: &str, body: &[u8]) -> String {
    let mut hasher = Sha256::new();
    hasher.update(method.as_bytes());
    hasher.update(b" ");
    hasher.update(url.as_bytes());
    hasher.update(b"\n");
    hasher.update(body);
    hex::encode(hasher.finalize())
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl L402Client {
    pub fn new(wallet: Wallet) -> Result<L402Client, L402Error> {
        // Redirects are followed within the origin only: a credential (and the cache entry it becomes) belongs to
        // the origin that sold it, and a payment's counterparty is the host that was asked.
        let redirects = reqwest::redirect::Policy::custom(|attempt| {
            let same_origin = attempt
                .previous()
                .first()
                .is_some_and(|first| origin_of(first) == origin_of(attempt.url()));
            if attempt.previous().len() >= 10 || !same_origin {
                attempt.stop()
            } else {
                attempt.follow()
            }
        });
        let http = reqwest::Client::builder()
            .redirect(redirects)
            .connect_timeout(Duration::from_secs(15))
            .user_agent(concat!("automaton/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| L402Error::BadRequest(format!("HTTP client: {e}")))?;
        Ok(L402Client { wallet, http })
    }

    fn db(&self) -> &Db {
        self.wallet.db()
    }

    /// Fetches `request.url`, buying an L402 credential when the server asks for one and policy allows.
    pub async fn fetch(&self, request: FetchRequest) -> Result<FetchResponse, L402Error> {
        let url = Url::parse(request.url.trim()).map_err(|e| {
            L402Error::BadRequest(format!("`{}` is not a URL: {e}", request.url.trim()))
        })?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(L402Error::BadRequest(format!(
                "`{url}` must be an http:// or https:// URL"
            )));
        }
        let method = Method::from_bytes(request.method.trim().to_ascii_uppercase().as_bytes())
            .map_err(|_| {
                L402Error::BadRequest(format!("`{}` is not an HTTP method", request.method))
            })?;
        let mut headers = HeaderMap::new();
        for (name, value) in &request.headers {
            let name = HeaderName::from_bytes(name.trim().as_bytes())
                .map_err(|_| L402Error::BadRequest(format!("`{name}` is not a header name")))?;
            let value = HeaderValue::from_str(value.trim()).map_err(|_| {
                L402Error::BadRequest(format!("the value of header {name} is not valid"))
            })?;
            headers.append(name, value);
        }
        let body = request.body.clone().unwrap_or_default();
        let timeout = request.timeout.unwrap_or(DEFAULT_TIMEOUT);
        let exchange = Exchange {
            url: url.clone(),
            method,
            headers,
            body,
            timeout,
        };

        // A credential bought earlier for this origin and path goes out on the first attempt.
        let cached = self.cached_token(&url).await?;
        let first = self
            .send(
                &exchange,
                cached.as_ref().map(|t| (t.token.as_str(), &t.preimage)),
            )
            .await?;
        if first.status != StatusCode::PAYMENT_REQUIRED {
            if let Some(token) = &cached {
                self.touch(token).await?;
            }
            return Ok(FetchResponse {
                status: first.status.as_u16(),
                headers: first.headers,
                body: first.body,
                paid_msat: 0,
                fee_msat: 0,
                payment_hash: None,
                from_cache: cached.is_some(),
                receipt_id: None,
            });
        }
        if let Some(token) = &cached {
            // The server no longer honours it (expired, revoked, per-call): forget it and buy anew.
            tracing::info!(origin = %token.origin, path = %token.path_prefix, "the server rejected a cached L402 credential; dropping it");
            self.drop_token(token).await?;
        }
        self.buy_and_retry(&exchange, &request, first).await
    }

    async fn buy_and_retry(
        &self,
        exchange: &Exchange,
        request: &FetchRequest,
        challenge_response: Raw,
    ) -> Result<FetchResponse, L402Error> {
        let url_text = exchange.url.to_string();
        let refuse = |reason: String| L402Error::BadChallenge {
            url: url_text.clone(),
            reason,
        };
        let values: Vec<&str> = challenge_response
            .headers
            .get_all(WWW_AUTHENTICATE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        let challenges = l402::parse_challenges(values).map_err(|e| refuse(e.to_string()))?;
        let challenge = l402::preferred(&challenges)
            .ok_or_else(|| refuse("no L402 challenge".into()))?
            .clone();
        let committed = challenge
            .payment_hash()
            .map_err(|e| refuse(e.to_string()))?;
        let macaroon = challenge.macaroon().map_err(|e| refuse(e.to_string()))?;
        let invoice = self
            .wallet
            .decode_invoice(&challenge.invoice)
            .map_err(|e| refuse(format!("its invoice: {e}")))?;
        if invoice.payment_hash != hex::encode(committed) {
            return Err(refuse(
                "the invoice's payment hash is not the one the macaroon commits to".into(),
            ));
        }
        let price_msat = invoice
            .amount_msat
            .filter(|a| *a > 0)
            .ok_or_else(|| refuse("its invoice has no amount".into()))?;
        if price_msat > request.max_sats.saturating_mul(1000) {
            return Err(L402Error::OverCap {
                url: url_text.clone(),
                price_msat,
                max_sats: request.max_sats,
            });
        }
        let host = exchange.url.host_str().unwrap_or_default().to_string();
        let purpose = match request.purpose.as_deref().map(str::trim) {
            Some(p) if !p.is_empty() => format!(
                "{p}: L402 {} {host}{}",
                exchange.method,
                exchange.url.path()
            ),
            _ => format!("L402 {} {host}{}", exchange.method, exchange.url.path()),
        };
        // No payment hash in it: every 402 brings a fresh invoice, and an approval the creator gives for "this call
        // at this price" must match the next attempt. The receipts still pay each invoice at most once.
        let purpose: String = purpose.chars().take(200).collect();
        let spend = SpendRequest {
            amount_msat: price_msat,
            max_fee_msat: spend::default_max_fee_msat(&self.wallet, price_msat),
            rail: Rail::L402,
            purpose,
            counterparty: Some(host),
        };
        let hash = invoice.payment_hash.clone();
        let permit = spend::authorize(&self.wallet, spend, ApprovalWait::default()).await?;
        tracing::info!(url = %crate::lnurl::redacted(&exchange.url), payment_hash = %hash, amount_msat = price_msat,
            "buying an L402 credential");
        let (paid_msat, fee_msat, receipt_id) =
            match self.wallet.pay_invoice(permit, &invoice).await {
                Ok(paid) => (paid.amount_msat, paid.fee_msat, paid.receipt_id),
                // Paid before (a retry after a crash, a concurrent request): the proof is already on file.
                Err(WalletError::DuplicatePayment { .. }) => {
                    match receipts::get_by_hash(self.db(), &hash, Direction::Out).await? {
                        Some(r) if r.status == ReceiptStatus::Succeeded => (0, 0, r.id),
                        _ => {
                            return Err(WalletError::DuplicatePayment { payment_hash: hash }.into())
                        }
                    }
                }
                Err(e) => return Err(e.into()),
            };
        let receipt = receipts::get_by_hash(self.db(), &hash, Direction::Out)
            .await?
            .ok_or_else(|| crate::money::MoneyError::UnknownReceipt(hash.clone()))?;
        // Done only with proof: the preimage must hash to the payment hash the macaroon commits to.
        let preimage = receipt
            .preimage
            .map(|p| *p.bytes())
            .filter(|p| l402::identifier::preimage_matches(p, &committed))
            .ok_or_else(|| {
                L402Error::Wallet(WalletError::PaymentFailed {
                    payment_hash: hash.clone(),
                    reason: "the payment reported success without a preimage matching its hash"
                        .into(),
                })
            })?;
        let token_id = l402::Identifier::decode(macaroon.identifier())
            .ok()
            .map(|id| hex::encode(id.token_id));
        let valid_until = l402::caveats::earliest_expiry(&macaroon);
        let cached = CachedToken {
            origin: origin_of(&exchange.url),
            path_prefix: exchange.url.path().to_string(),
            token: challenge.token.clone(),
            preimage,
        };
        self.store_token(&cached, &hash, token_id.as_deref(), price_msat, valid_until)
            .await?;

        let answer = self
            .send(exchange, Some((cached.token.as_str(), &cached.preimage)))
            .await?;
        receipts::set_body_hashes(
            self.db(),
            &receipt_id,
            Some(request_hash(
                exchange.method.as_str(),
                exchange.url.as_str(),
                &exchange.body,
            )),
            Some(receipts::body_hash(&answer.body)),
        )
        .await?;
        receipts::merge_meta(
            self.db(),
            &receipt_id,
            json!({
                "url": exchange.url.as_str(),
                "method": exchange.method.as_str(),
                "http_status": answer.status.as_u16(),
                "token_id": token_id,
                "scheme": challenge.scheme.as_str(),
            }),
        )
        .await?;
        if let Err(error) = self.wallet.resign_receipt(&receipt_id).await {
            tracing::warn!(%error, receipt = %receipt_id, "could not sign the L402 receipt again");
        }
        if answer.status == StatusCode::PAYMENT_REQUIRED {
            self.drop_token(&cached).await?;
            return Err(L402Error::RejectedAfterPayment {
                url: url_text,
                payment_hash: hash,
                paid_msat,
            });
        }
        Ok(FetchResponse {
            status: answer.status.as_u16(),
            headers: answer.headers,
            body: answer.body,
            paid_msat,
            fee_msat,
            payment_hash: Some(hash),
            from_cache: false,
            receipt_id: Some(receipt_id),
        })
    }

    /// One HTTP exchange, with the credential when given.
    async fn send(
        &self,
        exchange: &Exchange,
        credential: Option<(&str, &[u8; 32])>,
    ) -> Result<Raw, L402Error> {
        let mut builder = self
            .http
            .request(exchange.method.clone(), exchange.url.clone())
            .headers(exchange.headers.clone())
            .timeout(exchange.timeout);
        if let Some((token, preimage)) = credential {
            let value = HeaderValue::from_str(&l402::format_authorization(token, preimage))
                .map_err(|_| {
                    L402Error::BadRequest("the cached credential is not a valid header".into())
                })?;
            builder = builder.header(AUTHORIZATION, value);
        }
        if !exchange.body.is_empty() {
            builder = builder.body(exchange.body.clone());
        }
        let shown = crate::lnurl::redacted(&exchange.url);
        let http_err = |e: reqwest::Error| L402Error::Http {
            url: shown.clone(),
            reason: e.without_url().to_string(),
        };
        let mut response = builder.send().await.map_err(http_err)?;
        let status = response.status();
        let headers = response.headers().clone();
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(http_err)? {
            if body.len() + chunk.len() > MAX_BODY {
                return Err(L402Error::Http {
                    url: shown.clone(),
                    reason: format!("the response is larger than {} MiB", MAX_BODY >> 20),
                });
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Raw {
            status,
            headers,
            body,
        })
    }

    /// The longest cached path prefix covering `url`, if unexpired; expired ones are deleted on the way.
    async fn cached_token(&self, url: &Url) -> Result<Option<CachedToken>, L402Error> {
        let origin = origin_of(url);
        let path = url.path().to_string();
        let now = now_unix() as i64;
        let rows = self
            .db()
            .call(move |c| {
                c.execute(
                    "DELETE FROM l402_tokens WHERE valid_until IS NOT NULL AND valid_until <= ?1",
                    [now],
                )?;
                let mut stmt = c.prepare(
                    "SELECT path_prefix, token, preimage FROM l402_tokens WHERE origin = ?1 \
                     ORDER BY length(path_prefix) DESC",
                )?;
                let rows = stmt.query_map([&origin], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                    ))
                })?;
                rows.collect::<rusqlite::Result<Vec<_>>>()
                    .map(|rows| (origin, rows))
            })
            .await?;
        let (origin, rows) = rows;
        Ok(rows
            .into_iter()
            .filter(|(prefix, _, _)| path_covers(prefix, &path))
            .find_map(|(path_prefix, token, preimage)| {
                let preimage: [u8; 32] = hex::decode(preimage).ok()?.try_into().ok()?;
                Some(CachedToken {
                    origin: origin.clone(),
                    path_prefix,
                    token,
                    preimage,
                })
            }))
    }

    async fn store_token(
        &self,
        token: &CachedToken,
        payment_hash: &str,
        token_id: Option<&str>,
        amount_msat: u64,
        valid_until: Option<u64>,
    ) -> Result<(), L402Error> {
        let (t, hash, id) = (
            token.clone(),
            payment_hash.to_string(),
            token_id.map(str::to_string),
        );
        self.db()
            .call(move |c| {
                c.execute(
                    "INSERT INTO l402_tokens (origin, path_prefix, token, preimage, payment_hash, token_id, \
                     amount_msat, valid_until, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) \
                     ON CONFLICT(origin, path_prefix) DO UPDATE SET token = excluded.token, \
                     preimage = excluded.preimage, payment_hash = excluded.payment_hash, token_id = excluded.token_id, \
                     amount_msat = excluded.amount_msat, valid_until = excluded.valid_until, \
                     created_at = excluded.created_at, last_used_at = NULL",
                    rusqlite::params![
                        t.origin,
                        t.path_prefix,
                        t.token,
                        hex::encode(t.preimage),
                        hash,
                        id,
                        amount_msat as i64,
                        valid_until.map(|v| v.min(i64::MAX as u64) as i64),
                        crate::state::now_rfc3339()
                    ],
                )
            })
            .await?;
        Ok(())
    }

    async fn drop_token(&self, token: &CachedToken) -> Result<(), L402Error> {
        let (origin, prefix, value) = (
            token.origin.clone(),
            token.path_prefix.clone(),
            token.token.clone(),
        );
        self.db()
            .call(move |c| {
                c.execute(
                    "DELETE FROM l402_tokens WHERE origin = ?1 AND path_prefix = ?2 AND token = ?3",
                    rusqlite::params![origin, prefix, value],
                )
            })
            .await?;
        Ok(())
    }

    async fn touch(&self, token: &CachedToken) -> Result<(), L402Error> {
        let (origin, prefix) = (token.origin.clone(), token.path_prefix.clone());
        self.db()
            .call(move |c| {
                c.execute(
                    "UPDATE l402_tokens SET last_used_at = ?3 WHERE origin = ?1 AND path_prefix = ?2",
                    rusqlite::params![origin, prefix, crate::state::now_rfc3339()],
                )
            })
            .await?;
        Ok(())
    }
}

/// A cached credential as `l402 tokens` lists it (never the preimage or the token itself).
#[derive(Clone, Debug, Serialize)]
pub struct TokenInfo {
    pub origin: String,
    pub path_prefix: String,
    pub payment_hash: String,
    pub token_id: Option<String>,
    pub amount_msat: u64,
    pub valid_until: Option<i64>,
    pub created_at: String,
    pub last_used_at: Option<String>,
}

/// Every cached credential, newest first.
pub fn list_tokens(db: &Db) -> Result<Vec<TokenInfo>, crate::state::StateError> {
    db.call_blocking(|c| {
        let mut stmt = c.prepare(
            "SELECT origin, path_prefix, payment_hash, token_id, amount_msat, valid_until, created_at, last_used_at \
             FROM l402_tokens ORDER BY created_at DESC",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(TokenInfo {
                origin: r.get(0)?,
                path_prefix: r.get(1)?,
                payment_hash: r.get(2)?,
                token_id: r.get(3)?,
                amount_msat: r.get::<_, i64>(4)?.max(0) as u64,
                valid_until: r.get(5)?,
                created_at: r.get(6)?,
                last_used_at: r.get(7)?,
            })
        })?;
        rows.collect()
    })
}

/// Drops the cached credentials covering `url` (every one with `None`); returns how many.
pub fn forget_tokens(db: &Db, url: Option<&str>) -> Result<usize, L402Error> {
    let Some(url) = url else {
        return Ok(db.call_blocking(|c| c.execute("DELETE FROM l402_tokens", []))?);
    };
    let url = Url::parse(url.trim())
        .map_err(|e| L402Error::BadRequest(format!("`{}` is not a URL: {e}", url.trim())))?;
    let origin = origin_of(&url);
    let path = url.path().to_string();
    Ok(db.call_blocking(move |c| {
        let prefixes: Vec<String> = {
            let mut stmt = c.prepare("SELECT path_prefix FROM l402_tokens WHERE origin = ?1")?;
            let rows = stmt.query_map([&origin], |r| r.get(0))?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        let mut dropped = 0;
        for prefix in prefixes.into_iter().filter(|p| path_covers(p, &path)) {
            dropped += c.execute(
                "DELETE FROM l402_tokens WHERE origin = ?1 AND path_prefix = ?2",
                rusqlite::params![origin, prefix],
            )?;
        }
        Ok(dropped)
    })?)
}

/// The payment hash a cached credential for `url` was bought with, if one is cached (tests, `status`).
pub fn cached_payment_hash(db: &Db, url: &str) -> Option<String> {
    let url = Url::parse(url).ok()?;
    let origin = origin_of(&url);
    let path = url.path().to_string();
    let rows: Vec<(String, String)> = db
        .call_blocking(move |c| {
            let mut stmt = c.prepare(
                "SELECT path_prefix, payment_hash FROM l402_tokens WHERE origin = ?1 ORDER BY length(path_prefix) DESC",
            )?;
            let rows = stmt.query_map([origin], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect()
        })
        .ok()?;
    rows.into_iter()
        .find(|(prefix, _)| path_covers(prefix, &path))
        .map(|(_, hash)| hash)
}

struct Exchange {
    url: Url,
    method: Method,
    headers: HeaderMap,
    body: Vec<u8>,
    timeout: Duration,
}

struct Raw {
    status: StatusCode,
    headers: HeaderMap,
    body: Vec<u8>,
}

/// Paid inference (`inference.auth: l402`): the OpenAI backend sends its requests through the buyer, which pays
/// per call under the purpose `inference` (so the inference cap applies) and at most `max_sats` per call.
pub struct InferencePayer {
    client: L402Client,
    max_sats: u64,
}

impl InferencePayer {
    pub fn new(wallet: Wallet, max_sats: u64) -> Result<InferencePayer, L402Error> {
        Ok(InferencePayer {
            client: L402Client::new(wallet)?,
            max_sats,
        })
    }
}

/// The paying transport `inference.auth: l402` asks for: `None` with `auth: api_key`; an error when L402 is asked
/// for but the agent has no wallet to pay with.
pub fn inference_payer(
    config: &crate::config::Config,
    wallet: Option<&Wallet>,
) -> Result<Option<std::sync::Arc<dyn PaidHttp>>, InferenceError> {
    if config.inference.auth != crate::config::InferenceAuth::L402 {
        return Ok(None);
    }
    let wallet = wallet.ok_or_else(|| {
        InferenceError::Config(
            "inference.auth is l402 but this agent has no wallet to pay with".into(),
        )
    })?;
    let payer = InferencePayer::new(wallet.clone(), config.inference.l402_max_sats)
        .map_err(|e| InferenceError::Config(e.to_string()))?;
    Ok(Some(std::sync::Arc::new(payer)))
}

#[async_trait]
impl PaidHttp for InferencePayer {
    async fn post(
        &self,
        url: &str,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<PaidHttpResponse, InferenceError> {
        // The node may still be starting when the first turn thinks: wait for it rather than fail the call.
        if let Err(e) = self.client.wallet.wait_ready(timeout.min(READY_WAIT)).await {
            return Err(InferenceError::Network(format!(
                "cannot pay for inference yet: {e}"
            )));
        }
        let request = FetchRequest {
            url: url.to_string(),
            method: "POST".into(),
            headers,
            body: Some(body),
            max_sats: self.max_sats,
            purpose: Some("inference".into()),
            timeout: Some(timeout),
        };
        match self.client.fetch(request).await {
            Ok(response) => Ok(PaidHttpResponse {
                status: response.status,
                headers: response.headers,
                body: response.body,
                paid_msat: response.paid_msat,
            }),
            Err(L402Error::Http { reason, .. }) => {
                if reason.to_ascii_lowercase().contains("timed out") {
                    Err(InferenceError::Timeout(timeout))
                } else {
                    Err(InferenceError::Network(reason))
                }
            }
            Err(L402Error::BadRequest(m)) => Err(InferenceError::Config(m)),
            Err(L402Error::Wallet(WalletError::NotReady { reason })) => {
                Err(InferenceError::Network(format!(
                    "cannot pay for inference yet: the Lightning node is not ready ({reason})"
                )))
            }
            Err(other) => Err(InferenceError::PaymentRequired {
                challenge: None,
                message: format!("paying for inference over L402 failed: {other}"),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_cover_themselves_and_below_only() {
        assert!(path_covers("/api", "/api"));
        assert!(path_covers("/api", "/api/v1/x"));
        assert!(path_covers("/api/", "/api/x"));
        assert!(!path_covers("/api", "/apix"));
        assert!(!path_covers("/api/v1", "/api"));
        assert!(path_covers("/", "/anything"));
    }

    #[test]
    fn origins_name_the_port() {
        let a = Url::parse("https://Example.com/x").unwrap();
        let b = Url::parse("https://example.com:443/y").unwrap();
        assert_eq!(origin_of(&a), origin_of(&b));
        let c = Url::parse("http://127.0.0.1:8080/").unwrap();
        assert_eq!(origin_of(&c), "http://127.0.0.1:8080");
    }

    #[test]
    fn request_hashes_bind_method_url_and_body() {
        let a = request_hash("GET", "http://x/a", b"");
        assert_ne!(a, request_hash("POST", "http://x/a", b""));
        assert_ne!(a, request_hash("GET", "http://x/b", b""));
        assert_ne!(
            request_hash("POST", "http://x/a", b"1"),
            request_hash("POST", "http://x/a", b"2")
        );
    }
}
