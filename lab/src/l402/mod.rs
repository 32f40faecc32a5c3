//! L402 sellers in the lab, paid to the merchant: a paywalled demo API (`l402_api_url`) and a paywalled
//! OpenAI-compatible model (`l402_model_url`, the scripted model behind a per-call paywall). They speak L402 the
//! way Aperture does (both `LSAT` and `L402` challenges, fresh 402 for any bad credential, `Payment-Receipt` on
//! paid answers), and offer a few deliberately odd endpoints under `/test/` for buyers' safety tests.

pub mod api;
pub mod model;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use automaton_l402::mint::{mint, MintRequest};
use automaton_l402::verify::{verify_credential, VerifyContext, VerifyError};
use automaton_l402::{challenge_headers, format_challenge_v0, Credential, Scheme, Service};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::peers::merchant::{self, InvoiceDescription};
use crate::peers::Peers;

/// How a paid endpoint challenges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChallengeForm {
    /// Aperture's: `LSAT macaroon=…` then `L402 macaroon=…`.
    Aperture,
    /// The spec's current form only: `L402 version="0", token=…`.
    TokenV0,
    /// Only the legacy `LSAT` header.
    LsatOnly,
    /// A 402 whose challenge has no usable token (a buyer must not pay).
    Malformed,
    /// A real invoice, but a macaroon committing to another payment hash (a buyer must not pay).
    Mismatch,
}

/// One priced offer.
#[derive(Debug, Clone)]
pub struct Offer {
    pub service: &'static str,
    pub price_msat: u64,
    /// Written into the macaroon as `<service>_valid_until`.
    pub validity_secs: u64,
    pub form: ChallengeForm,
    /// The token pays for one successful call (the paid model); otherwise it is reusable until it expires.
    pub single_use: bool,
    /// Never accepts a credential (a buyer must stop after one paid retry).
    pub never_accept: bool,
}

impl Offer {
    pub const fn new(service: &'static str, price_sats: u64, validity_secs: u64) -> Offer {
        Offer {
            service,
            price_msat: price_sats * 1000,
            validity_secs,
            form: ChallengeForm::Aperture,
            single_use: false,
            never_accept: false,
        }
    }
}

struct Minted {
    root_key: [u8; 32],
    /// Single-use tokens: spent once a call succeeded; `in_use` while a call runs.
    spent: bool,
    in_use: bool,
}

/// The lab's L402 mint and verifier; invoices come from the merchant, root keys live in memory (a restarted lab
/// forgets them and buyers simply pay again).
pub struct Paywall {
    peers: Arc<Peers>,
    keys: Mutex<HashMap<[u8; 32], Minted>>,
    /// Challenges issued and credentials accepted, for tests and `GET /` (`{service: [issued, accepted]}`).
    counters: Mutex<HashMap<&'static str, [u64; 2]>>,
}

/// An accepted credential.
pub struct Paid {
    pub payment_hash: [u8; 32],
    pub root_key_id: [u8; 32],
}

impl Paywall {
    pub fn new(peers: Arc<Peers>) -> Arc<Paywall> {
        Arc::new(Paywall {
            peers,
            keys: Mutex::new(HashMap::new()),
            counters: Mutex::new(HashMap::new()),
        })
    }

    fn count(&self, service: &'static str, index: usize) {
        let mut counters = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        counters.entry(service).or_default()[index] += 1;
    }

    /// `{service: {"challenges": n, "accepted": m}}`.
    pub fn stats(&self) -> serde_json::Value {
        let counters = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        let map: serde_json::Map<String, serde_json::Value> = counters
            .iter()
            .map(|(k, [issued, accepted])| {
                (
                    k.to_string(),
                    json!({"challenges": issued, "accepted": accepted}),
                )
            })
            .collect();
        serde_json::Value::Object(map)
    }

    /// Checks the request's credential for `offer`; `Err` is the response to send (a fresh 402, or 500).
    pub async fn check(&self, offer: &Offer, headers: &HeaderMap) -> Result<Paid, Response> {
        let credentials = credentials(headers);
        if credentials.is_empty() {
            return Err(self.challenge(offer, "no credential").await);
        }
        let mut reason = String::from("no credential verified");
        for credential in &credentials {
            match self.verify(offer, credential).await {
                Ok(paid) => {
                    self.count(offer.service, 1);
                    return Ok(paid);
                }
                Err(why) => reason = why,
            }
        }
        Err(self.challenge(offer, &reason).await)
    }

    async fn verify(&self, offer: &Offer, credential: &Credential) -> Result<Paid, String> {
        if offer.never_accept {
            return Err("this endpoint never accepts a credential".into());
        }
        let now = unix_now();
        let ctx = VerifyContext {
            service: offer.service,
            capability: None,
            now_unix: now,
        };
        let verified = {
            let keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
            verify_credential(credential, &ctx, |id| {
                keys.get(id)
                    .filter(|m| !(offer.single_use && m.spent))
                    .map(|m| m.root_key)
            })
        }
        .map_err(|e| match e {
            VerifyError::UnknownRootKey if offer.single_use => {
                "unknown or already spent token".to_string()
            }
            e => e.to_string(),
        })?;
        let hash = hex::encode(verified.identifier.payment_hash);
        let status =
            merchant::invoice_status(&self.peers.merchant, &hash).map_err(|e| e.to_string())?;
        // The preimage is the proof (as Aperture takes it). The merchant's node may still be recording its claim
        // when the buyer comes back with it, so only an invoice that failed is refused here.
        if !status.paid && status.status != "pending" {
            return Err(format!("the invoice is {}", status.status));
        }
        if offer.single_use {
            let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
            match keys.get_mut(&verified.root_key_id) {
                Some(m) if !m.spent && !m.in_use => m.in_use = true,
                _ => return Err("the token is being used by another call or was spent".into()),
            }
        }
        Ok(Paid {
            payment_hash: verified.identifier.payment_hash,
            root_key_id: verified.root_key_id,
        })
    }

    /// A single-use token's call finished: spent when it succeeded, usable again otherwise.
    pub fn finish(&self, paid: &Paid, succeeded: bool) {
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = keys.get_mut(&paid.root_key_id) {
            m.in_use = false;
            m.spent |= succeeded;
        }
    }

    /// A fresh 402: a new merchant invoice and a new macaroon.
    pub async fn challenge(&self, offer: &Offer, reason: &str) -> Response {
        let memo = format!("lab L402: {}", offer.service);
        let invoice = match merchant::create_invoice(
            &self.peers.merchant,
            offer.price_msat,
            InvoiceDescription::Memo(memo),
            None,
        )
        .await
        {
            Ok(invoice) => invoice,
            Err(e) => {
                return (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    axum::Json(
                        json!({"error": format!("the merchant cannot make an invoice: {e}")}),
                    ),
                )
                    .into_response()
            }
        };
        let payment_hash: [u8; 32] = match hex::decode(&invoice.payment_hash)
            .ok()
            .and_then(|b| b.try_into().ok())
        {
            Some(h) => h,
            None => return (StatusCode::INTERNAL_SERVER_ERROR, "bad payment hash").into_response(),
        };
        // The mismatch endpoint commits the macaroon to another payment: paying the invoice cannot unlock it.
        let committed = if offer.form == ChallengeForm::Mismatch {
            let mut other = payment_hash;
            other[0] ^= 0xff;
            other
        } else {
            payment_hash
        };
        let services = [Service::new(offer.service, 0)];
        let minted = mint(&MintRequest {
            payment_hash: committed,
            services: &services,
            capabilities: &[],
            valid_until: Some(unix_now() + offer.validity_secs),
        });
        self.keys.lock().unwrap_or_else(|p| p.into_inner()).insert(
            minted.root_key_id,
            Minted {
                root_key: minted.root_key,
                spent: false,
                in_use: false,
            },
        );
        self.count(offer.service, 0);
        let token = minted.macaroon.to_base64();
        let values: Vec<String> = match offer.form {
            ChallengeForm::Aperture | ChallengeForm::Mismatch => {
                challenge_headers(&token, &invoice.bolt11).to_vec()
            }
            ChallengeForm::TokenV0 => vec![format_challenge_v0(&token, &invoice.bolt11)],
            ChallengeForm::LsatOnly => vec![automaton_l402::format_challenge(
                Scheme::Lsat,
                &token,
                &invoice.bolt11,
            )],
            ChallengeForm::Malformed => vec![format!(
                "L402 macaroon=\"{}\" invoice",
                &token[..token.len() / 2]
            )],
        };
        let mut response = (
            StatusCode::PAYMENT_REQUIRED,
            axum::Json(json!({
                "error": "payment required",
                "reason": reason,
                "service": offer.service,
                "price_sats": offer.price_msat / 1000,
            })),
        )
            .into_response();
        for value in values {
            if let Ok(v) = HeaderValue::from_str(&value) {
                response
                    .headers_mut()
                    .append(axum::http::header::WWW_AUTHENTICATE, v);
            }
        }
        response
    }
}

/// Every credential the request carries: `Authorization: L402|LSAT …` headers (each may hold several tokens) and
/// Aperture's `Macaroon` / `Grpc-Metadata-Macaroon` headers with a `preimage=` caveat.
pub fn credentials(headers: &HeaderMap) -> Vec<Credential> {
    let pairs: Vec<(&str, &str)> = headers
        .iter()
        .filter_map(|(name, value)| Some((name.as_str(), value.to_str().ok()?)))
        .collect();
    automaton_l402::credentials_in(pairs.iter().copied())
}

/// `Payment-Receipt`: base64url (no padding) of `{status, method, timestamp, reference}` (specs/l402.md §5).
pub fn payment_receipt(payment_hash: &[u8; 32]) -> HeaderValue {
    let body = json!({
        "status": "success",
        "method": "lightning",
        "timestamp": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        "reference": hex::encode(payment_hash),
    });
    let encoded = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(body.to_string());
    HeaderValue::from_str(&encoded).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Serves both sellers on their listeners until `cancel`; returns their base URLs (`l402_api_url`,
/// `l402_model_url`) and the server tasks.
pub fn serve(
    peers: Arc<Peers>,
    api_listener: TcpListener,
    model_listener: TcpListener,
    cancel: CancellationToken,
) -> anyhow::Result<(String, String, Vec<tokio::task::JoinHandle<()>>)> {
    let paywall = Paywall::new(peers);
    let api_url = format!("http://{}{}", api_listener.local_addr()?, api::BASE_PATH);
    let model_url = format!("http://{}/v1", model_listener.local_addr()?);
    let tasks = vec![
        spawn(
            api_listener,
            api::router(Arc::clone(&paywall)),
            cancel.clone(),
            "l402-api",
        ),
        spawn(model_listener, model::router(paywall), cancel, "l402-model"),
    ];
    Ok((api_url, model_url, tasks))
}

fn spawn(
    listener: TcpListener,
    app: axum::Router,
    cancel: CancellationToken,
    name: &'static str,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(cancel.cancelled_owned())
            .await
        {
            tracing::error!(server = name, error = %e, "server stopped");
        }
    })
}
