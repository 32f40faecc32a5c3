//! The agent's Lightning address: an LNURL-pay service (LUD-06, LUD-16 addresses, LUD-12 comments, LUD-21 verify).
//!
//! `GET /.well-known/lnurlp/<name>` → the pay request, whose metadata (`text/plain` + `text/identifier`) is one
//! string built at start and served byte-for-byte the same; `GET /lnurlp/cb/<name>?amount=&comment=` → a real
//! invoice from the agent's node for exactly `amount` msat with description hash = SHA-256 of that string, recorded
//! (with the payer's comment) before it is handed out; `GET /lnurlp/verify/<hash>` → settled or not, read from the
//! node's own payment store. Errors are LUD-01's `{"status":"ERROR","reason":…}`.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::{Advertised, FaceState};
use crate::config::Config;
use crate::money::receipts::{self, Direction};

/// Purpose recorded on receipts of payments to the Lightning address.
pub const PURPOSE: &str = "lnurl-pay";

/// The metadata string (LUD-06): a JSON array of `[type, value]`, with exactly one `text/plain` and the address as
/// `text/identifier` (LUD-16).
pub fn metadata(config: &Config, advertised: &Advertised) -> String {
    let description = config
        .http
        .lnurl
        .description
        .clone()
        .unwrap_or_else(|| format!("Fund {}, an autonomous agent", config.name.trim()));
    let mut entries = vec![json!(["text/plain", description])];
    if let Some(address) = &advertised.lightning_address {
        entries.push(json!(["text/identifier", address]));
    }
    Value::Array(entries).to_string()
}

fn error(reason: impl Into<String>) -> Response {
    // LUD-01: the status code carries no meaning; 200 with the ERROR body is what every wallet reads.
    (
        StatusCode::OK,
        Json(json!({"status": "ERROR", "reason": reason.into()})),
    )
        .into_response()
}

/// How long a callback waits for a starting node before answering with an error (wallets give up near 30 s).
const NODE_WAIT: std::time::Duration = std::time::Duration::from_secs(15);

/// At most this many LNURL-pay invoices a minute: each one costs the node work (and may ask the LSP for a JIT
/// channel), and the callback is open to anyone.
const INVOICES_PER_MINUTE: usize = 60;

impl FaceState {
    fn allow_invoice(&self) -> bool {
        let now = std::time::Instant::now();
        let Ok(mut recent) = self.recent_invoices.lock() else {
            return false;
        };
        while recent
            .front()
            .is_some_and(|t| now.duration_since(*t) > std::time::Duration::from_secs(60))
        {
            recent.pop_front();
        }
        if recent.len() >= INVOICES_PER_MINUTE {
            return false;
        }
        recent.push_back(now);
        true
    }
}

/// LUD-16: `name+tag` is `name`.
fn known_name(state: &FaceState, requested: &str) -> bool {
    let base = requested.split('+').next().unwrap_or_default();
    base.eq_ignore_ascii_case(&state.advertised.name)
}

/// `GET /.well-known/lnurlp/<name>`.
pub async fn pay_request(
    State(state): State<Arc<FaceState>>,
    Path(name): Path<String>,
) -> Response {
    if let Some(why) = &state.advertised.lnurl_unavailable {
        return error(why.clone());
    }
    if !known_name(&state, &name) {
        return error(format!("no such Lightning address user `{name}`"));
    }
    if state.wallet.is_none() {
        return error("this agent has no wallet");
    }
    let lnurl = &state.config.http.lnurl;
    Json(json!({
        "tag": "payRequest",
        "callback": format!("{}/lnurlp/cb/{}", state.advertised.public_url, state.advertised.name),
        "minSendable": lnurl.min_sats.saturating_mul(1000),
        "maxSendable": lnurl.max_sats.saturating_mul(1000),
        "metadata": state.metadata,
        "commentAllowed": lnurl.comment_chars,
    }))
    .into_response()
}

/// `GET /lnurlp/cb/<name>?amount=<msat>[&comment=…]`.
pub async fn callback(
    State(state): State<Arc<FaceState>>,
    Path(name): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    if let Some(why) = &state.advertised.lnurl_unavailable {
        return error(why.clone());
    }
    if !known_name(&state, &name) {
        return error(format!("no such Lightning address user `{name}`"));
    }
    let Some(wallet) = state.wallet.as_ref() else {
        return error("this agent has no wallet");
    };
    let config = &state.config.http.lnurl;
    let (min, max) = (
        config.min_sats.saturating_mul(1000),
        config.max_sats.saturating_mul(1000),
    );
    let amount = match query.get("amount").map(|a| a.trim().parse::<u64>()) {
        Some(Ok(a)) => a,
        Some(Err(_)) => return error("amount must be a whole number of millisatoshis"),
        None => return error("amount (millisatoshis) is required"),
    };
    if amount < min || amount > max {
        return error(format!(
            "amount {amount} msat is outside {min}..={max} msat"
        ));
    }
    let comment = query
        .get("comment")
        .map(|c| c.trim().to_string())
        .filter(|c| !c.is_empty());
    if let Some(c) = &comment {
        let len = c.chars().count();
        if len > config.comment_chars as usize {
            return error(format!(
                "the comment has {len} characters; at most {} are accepted",
                config.comment_chars
            ));
        }
    }
    if !state.allow_invoice() {
        return error("too many invoices requested; try again in a minute");
    }
    // A payer who arrives while the node is still starting (just restarted) waits a moment instead of failing.
    if let Err(e) = wallet.wait_ready(NODE_WAIT).await {
        return error(format!("cannot create an invoice: {e}"));
    }
    let hash: [u8; 32] = Sha256::digest(state.metadata.as_bytes()).into();
    let created = match wallet
        .create_invoice_with_description_hash(
            amount,
            hash,
            config.invoice_expiry_secs,
            Some(PURPOSE),
            comment.as_deref(),
        )
        .await
    {
        Ok(created) => created,
        Err(e) => {
            tracing::warn!(error = %e, amount_msat = amount, "LNURL-pay invoice failed");
            return error(format!("cannot create an invoice: {e}"));
        }
    };
    let row = (
        created.payment_hash.clone(),
        state.advertised.name.clone(),
        amount,
        comment.clone(),
        created.bolt11.clone(),
    );
    let recorded = state
        .db
        .call(move |c| {
            c.execute(
                "INSERT INTO lnurl_invoices (payment_hash, name, amount_msat, comment, bolt11, created_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT(payment_hash) DO NOTHING",
                rusqlite::params![row.0, row.1, row.2 as i64, row.3, row.4, crate::state::now_rfc3339()],
            )
        })
        .await;
    if let Err(e) = recorded {
        tracing::error!(error = %e, "cannot record an LNURL-pay invoice");
        return error("cannot record the invoice");
    }
    tracing::info!(payment_hash = %created.payment_hash, amount_msat = amount,
        has_comment = comment.is_some(), jit = created.jit_channel, "LNURL-pay invoice issued");
    Json(json!({
        "pr": created.bolt11,
        "routes": [],
        "verify": format!("{}/lnurlp/verify/{}", state.advertised.public_url, created.payment_hash),
        "successAction": {
            "tag": "message",
            "message": format!("Thank you: {} received your payment.", state.config.name.trim())
                .chars().take(144).collect::<String>(),
        },
    }))
    .into_response()
}

/// `GET /lnurlp/verify/<payment_hash>` (LUD-21).
pub async fn verify(State(state): State<Arc<FaceState>>, Path(hash): Path<String>) -> Response {
    let hash = hash.trim().to_ascii_lowercase();
    if hash.len() != 64 || !hash.chars().all(|c| c.is_ascii_hexdigit()) {
        return error("Not found");
    }
    let lookup = hash.clone();
    let issued: Option<String> = match state
        .db
        .call(move |c| {
            use rusqlite::OptionalExtension;
            c.query_row(
                "SELECT bolt11 FROM lnurl_invoices WHERE payment_hash = ?1",
                [lookup],
                |r| r.get(0),
            )
            .optional()
        })
        .await
    {
        Ok(found) => found,
        Err(e) => {
            tracing::error!(error = %e, "cannot read LNURL-pay invoices");
            return error("cannot read the invoice");
        }
    };
    let Some(bolt11) = issued else {
        return error("Not found");
    };
    // The node's own payment store decides; the receipt (written by the event pump a moment later) is the
    // fallback while the node is down.
    let from_node = state.wallet.as_ref().and_then(|w| w.inbound_payment(&hash));
    let (settled, preimage) = match from_node {
        Some(p) => (p.settled, p.preimage.filter(|_| p.settled)),
        None => match receipts::get_by_hash(&state.db, &hash, Direction::In).await {
            Ok(Some(r)) if r.status == receipts::ReceiptStatus::Succeeded => {
                (true, r.preimage.map(|p| *p.bytes()))
            }
            _ => (false, None),
        },
    };
    Json(json!({
        "status": "OK",
        "settled": settled,
        "preimage": preimage.map(hex::encode),
        "pr": bolt11,
    }))
    .into_response()
}
