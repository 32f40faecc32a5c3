//! Control routes for the peers: creator payments, merchant invoices and `/lab/status`. Every error is JSON
//! `{"error": "...", "kind": "..."}` with a 4xx/5xx status.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{creator, merchant, NodeStatus, PeerError, Peers};

/// What the control routes need: the peers, and the chain's tip height for `/lab/status`.
#[derive(Clone)]
pub struct ControlState {
    pub peers: Arc<Peers>,
    pub chain_height: Arc<dyn Fn() -> u32 + Send + Sync>,
}

/// `/lab/creator/*`, `/lab/merchant/*` and `/lab/status`.
pub fn router(state: ControlState) -> Router {
    Router::new()
        .route("/lab/creator/pay", post(pay))
        .route("/lab/creator/keysend", post(keysend))
        .route("/lab/creator/pay-lnurl", post(pay_lnurl))
        .route("/lab/merchant/invoice", post(create_invoice))
        .route("/lab/merchant/invoice/{payment_hash}", get(invoice_status))
        .route("/lab/status", get(status))
        .with_state(state)
}

impl PeerError {
    /// The HTTP status the control API answers this error with.
    pub fn status_code(&self) -> StatusCode {
        match self {
            PeerError::BadRequest(_) => StatusCode::BAD_REQUEST,
            PeerError::NotFound(_) => StatusCode::NOT_FOUND,
            PeerError::Lnurl(e) => match e {
                super::lnurl::LnurlError::Http { .. } | super::lnurl::LnurlError::Service(_) => {
                    StatusCode::BAD_GATEWAY
                }
                super::lnurl::LnurlError::InvalidResponse(_)
                | super::lnurl::LnurlError::DescriptionHashMismatch
                | super::lnurl::LnurlError::AmountMismatch { .. }
                | super::lnurl::LnurlError::WrongNetwork(_)
                | super::lnurl::LnurlError::Expired
                | super::lnurl::LnurlError::UnsupportedSuccessAction(_) => StatusCode::BAD_GATEWAY,
                _ => StatusCode::BAD_REQUEST,
            },
            PeerError::Node { source, .. } => match source {
                ldk_node::NodeError::DuplicatePayment => StatusCode::CONFLICT,
                ldk_node::NodeError::InvalidInvoice
                | ldk_node::NodeError::InvalidAmount
                | ldk_node::NodeError::InvalidNodeId
                | ldk_node::NodeError::InvalidPaymentHash => StatusCode::BAD_REQUEST,
                ldk_node::NodeError::PaymentSendingFailed
                | ldk_node::NodeError::InsufficientFunds => StatusCode::UNPROCESSABLE_ENTITY,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            },
            PeerError::PaymentFailed { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            PeerError::PaymentTimeout { .. } | PeerError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            PeerError::Build { .. } | PeerError::Io { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// A stable machine-readable name for the error.
    pub fn kind(&self) -> &'static str {
        match self {
            PeerError::BadRequest(_) => "bad_request",
            PeerError::NotFound(_) => "not_found",
            PeerError::Lnurl(_) => "lnurl",
            PeerError::Node {
                source: ldk_node::NodeError::DuplicatePayment,
                ..
            } => "duplicate_payment",
            PeerError::Node { .. } => "node",
            PeerError::PaymentFailed { .. } => "payment_failed",
            PeerError::PaymentTimeout { .. } => "payment_timeout",
            PeerError::Timeout(_) => "timeout",
            PeerError::Build { .. } | PeerError::Io { .. } => "internal",
        }
    }
}

impl IntoResponse for PeerError {
    fn into_response(self) -> Response {
        let body = Json(json!({ "error": self.to_string(), "kind": self.kind() }));
        (self.status_code(), body).into_response()
    }
}

impl ControlState {
    /// Syncs `node` first if it is behind the chain: an HTLC sent from a stale height carries a CLTV expiry the
    /// next hop may already consider expired.
    async fn fresh(&self, node: &super::LabNode) -> Result<(), PeerError> {
        if node.node().status().current_best_block.height < (self.chain_height)() {
            node.sync().await?;
        }
        Ok(())
    }
}

/// A JSON body, or a JSON `{error}` 400 naming what was wrong with it.
fn body<T>(payload: Result<Json<T>, JsonRejection>) -> Result<T, PeerError> {
    payload
        .map(|Json(v)| v)
        .map_err(|e| PeerError::BadRequest(e.body_text()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PayRequest {
    bolt11: String,
    /// Only for invoices without an amount.
    #[serde(default)]
    amount_msat: Option<u64>,
}

async fn pay(
    State(state): State<ControlState>,
    payload: Result<Json<PayRequest>, JsonRejection>,
) -> Result<Json<creator::PaymentOutcome>, PeerError> {
    let req = body(payload)?;
    let invoice = creator::parse_invoice(&req.bolt11)?;
    state.fresh(&state.peers.creator).await?;
    Ok(Json(
        creator::pay_bolt11(&state.peers.creator, invoice, req.amount_msat).await?,
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysendRequest {
    node_id: String,
    sats: u64,
}

async fn keysend(
    State(state): State<ControlState>,
    payload: Result<Json<KeysendRequest>, JsonRejection>,
) -> Result<Json<creator::PaymentOutcome>, PeerError> {
    let req = body(payload)?;
    state.fresh(&state.peers.creator).await?;
    Ok(Json(
        creator::keysend(&state.peers.creator, &req.node_id, req.sats).await?,
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PayLnurlRequest {
    target: String,
    sats: u64,
    #[serde(default)]
    comment: Option<String>,
}

async fn pay_lnurl(
    State(state): State<ControlState>,
    payload: Result<Json<PayLnurlRequest>, JsonRejection>,
) -> Result<Json<creator::PaymentOutcome>, PeerError> {
    let req = body(payload)?;
    state.fresh(&state.peers.creator).await?;
    let peers = &state.peers;
    Ok(Json(
        creator::pay_lnurl(
            &peers.creator,
            peers.http(),
            &req.target,
            req.sats,
            req.comment.as_deref(),
        )
        .await?,
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InvoiceRequest {
    msat: u64,
    #[serde(default)]
    memo: Option<String>,
    /// Hex SHA-256 the invoice commits to instead of a memo (LNURL-pay metadata hash).
    #[serde(default)]
    description_hash: Option<String>,
    #[serde(default)]
    expiry_secs: Option<u32>,
}

async fn create_invoice(
    State(state): State<ControlState>,
    payload: Result<Json<InvoiceRequest>, JsonRejection>,
) -> Result<Json<merchant::CreatedInvoice>, PeerError> {
    let req = body(payload)?;
    let description = match (req.memo, req.description_hash) {
        (Some(_), Some(_)) => {
            return Err(PeerError::BadRequest(
                "give memo or description_hash, not both".into(),
            ));
        }
        (memo, None) => merchant::InvoiceDescription::Memo(memo.unwrap_or_default()),
        (None, Some(hash)) => {
            let hash: [u8; 32] = hex::decode(hash.trim())
                .ok()
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| {
                    PeerError::BadRequest("description_hash must be 64 hex characters".into())
                })?;
            merchant::InvoiceDescription::Hash(hash)
        }
    };
    let merchant = &state.peers.merchant;
    state.fresh(merchant).await?;
    Ok(Json(
        merchant::create_invoice(merchant, req.msat, description, req.expiry_secs).await?,
    ))
}

async fn invoice_status(
    State(state): State<ControlState>,
    Path(payment_hash): Path<String>,
) -> Result<Json<merchant::InvoiceStatus>, PeerError> {
    Ok(Json(merchant::invoice_status(
        &state.peers.merchant,
        &payment_hash,
    )?))
}

#[derive(Serialize)]
struct StatusResponse {
    chain_height: u32,
    nodes: Vec<NodeStatus>,
}

async fn status(State(state): State<ControlState>) -> Json<StatusResponse> {
    Json(StatusResponse {
        chain_height: (state.chain_height)(),
        nodes: state.peers.status(),
    })
}
