//! The lab's L402-paywalled demo API (`l402_api_url` = `http://127.0.0.1:PORT/api`).
//!
//! | route | price | what |
//! |---|---|---|
//! | `GET /` | free | index: endpoints, prices, challenge counts |
//! | `GET /api`, `GET /api/quote` | 10 sats, token valid 1 h | a quote (JSON) |
//! | `POST /api/echo` | same token | the body back, with its SHA-256 |
//! | `GET /test/short` | 10 sats, token valid 2 s | expiry tests |
//! | `GET /test/token-form` | 10 sats | only the spec's `L402 version="0", token=…` challenge |
//! | `GET /test/lsat-only` | 10 sats | only the legacy `LSAT` challenge |
//! | `GET /test/expensive` | 100,000 sats | above every default cap |
//! | `GET /test/malformed` | — | a 402 whose challenge has no invoice: never payable |
//! | `GET /test/mismatch` | 10 sats | the macaroon commits to another payment hash: a buyer must not pay |
//! | `GET /test/always-402` | 10 sats | accepts no credential: a buyer must give up after one paid retry |

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, MethodRouter};
use axum::{Json, Router};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::{payment_receipt, ChallengeForm, Offer, Paywall};

/// Where the paid API lives on its port (`l402_api_url` ends with it).
pub const BASE_PATH: &str = "/api";

pub const API: Offer = Offer::new("lab-api", 10, 3600);
pub const SHORT: Offer = Offer::new("lab-short", 10, 2);
pub const EXPENSIVE: Offer = Offer::new("lab-expensive", 100_000, 3600);
pub const TOKEN_FORM: Offer = Offer {
    form: ChallengeForm::TokenV0,
    ..Offer::new("lab-token-form", 10, 3600)
};
pub const LSAT_ONLY: Offer = Offer {
    form: ChallengeForm::LsatOnly,
    ..Offer::new("lab-lsat-only", 10, 3600)
};
pub const MALFORMED: Offer = Offer {
    form: ChallengeForm::Malformed,
    ..Offer::new("lab-malformed", 10, 3600)
};
pub const MISMATCH: Offer = Offer {
    form: ChallengeForm::Mismatch,
    ..Offer::new("lab-mismatch", 10, 3600)
};
pub const ALWAYS_402: Offer = Offer {
    never_accept: true,
    ..Offer::new("lab-always-402", 10, 3600)
};

const QUOTES: &[&str] = &[
    "Running bitcoin. — Hal Finney",
    "The root problem with conventional currency is all the trust that's required to make it work. — Satoshi Nakamoto",
    "Don't trust, verify.",
    "Lightning is a network of payment channels; each hop is a promise backed by a signature.",
    "A sat saved is a sat earned.",
];

struct ApiState {
    paywall: Arc<Paywall>,
    served: AtomicU64,
}

pub fn router(paywall: Arc<Paywall>) -> Router {
    let state = Arc::new(ApiState {
        paywall,
        served: AtomicU64::new(0),
    });
    Router::new()
        .route("/", get(index))
        .route(BASE_PATH, get(quote))
        .route("/api/quote", get(quote))
        .route("/api/echo", post(echo))
        .route("/test/short", paid(&SHORT))
        .route("/test/token-form", paid(&TOKEN_FORM))
        .route("/test/lsat-only", paid(&LSAT_ONLY))
        .route("/test/expensive", paid(&EXPENSIVE))
        .route("/test/malformed", paid(&MALFORMED))
        .route("/test/mismatch", paid(&MISMATCH))
        .route("/test/always-402", paid(&ALWAYS_402))
        .with_state(state)
}

async fn index(State(state): State<Arc<ApiState>>) -> Json<Value> {
    let offers = [
        &API,
        &SHORT,
        &TOKEN_FORM,
        &LSAT_ONLY,
        &EXPENSIVE,
        &MALFORMED,
        &MISMATCH,
        &ALWAYS_402,
    ];
    Json(json!({
        "name": "automaton-lab L402 demo API",
        "paid_to": "the lab merchant",
        "endpoints": [
            {"path": BASE_PATH, "method": "GET", "service": API.service, "price_sats": API.price_msat / 1000},
            {"path": "/api/quote", "method": "GET", "service": API.service, "price_sats": API.price_msat / 1000},
            {"path": "/api/echo", "method": "POST", "service": API.service, "price_sats": API.price_msat / 1000},
        ],
        "tests": offers.iter().skip(1).map(|o| json!({
            "service": o.service,
            "price_sats": o.price_msat / 1000,
            "validity_secs": o.validity_secs,
        })).collect::<Vec<_>>(),
        "stats": state.paywall.stats(),
    }))
}

async fn quote(State(state): State<Arc<ApiState>>, headers: HeaderMap) -> Response {
    let paid = match state.paywall.check(&API, &headers).await {
        Ok(paid) => paid,
        Err(challenge) => return challenge,
    };
    let n = state.served.fetch_add(1, Ordering::Relaxed);
    let mut response = Json(json!({
        "quote": QUOTES[(n as usize) % QUOTES.len()],
        "served": n + 1,
        "service": API.service,
    }))
    .into_response();
    response
        .headers_mut()
        .insert("payment-receipt", payment_receipt(&paid.payment_hash));
    response
}

async fn echo(State(state): State<Arc<ApiState>>, headers: HeaderMap, body: Bytes) -> Response {
    let paid = match state.paywall.check(&API, &headers).await {
        Ok(paid) => paid,
        Err(challenge) => return challenge,
    };
    let echoed = serde_json::from_slice::<Value>(&body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
    let mut response = Json(json!({
        "echo": echoed,
        "bytes": body.len(),
        "sha256": hex::encode(Sha256::digest(&body)),
    }))
    .into_response();
    response
        .headers_mut()
        .insert("payment-receipt", payment_receipt(&paid.payment_hash));
    response
}

/// A GET route that answers `{"ok": true}` once `offer` is paid.
fn paid(offer: &'static Offer) -> MethodRouter<Arc<ApiState>> {
    get(move |State(state): State<Arc<ApiState>>, headers: HeaderMap| simple(state, headers, offer))
}

async fn simple(state: Arc<ApiState>, headers: HeaderMap, offer: &'static Offer) -> Response {
    let paid = match state.paywall.check(offer, &headers).await {
        Ok(paid) => paid,
        Err(challenge) => return challenge,
    };
    let mut response = Json(json!({"ok": true, "service": offer.service})).into_response();
    response
        .headers_mut()
        .insert("payment-receipt", payment_receipt(&paid.payment_hash));
    response
}
