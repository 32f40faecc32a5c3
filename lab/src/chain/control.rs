//! Lab-only control routes for the chain: mine, faucet, reorg, chain status.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{parse_address, Chain, ChainError, Faults};

pub fn router(chain: Chain) -> Router {
    Router::new()
        .route("/lab/mine", post(mine))
        .route("/lab/faucet", post(faucet))
        .route("/lab/reorg", post(reorg))
        .route("/lab/chain", get(status))
        .route("/lab/faults", get(get_faults).post(set_faults))
        .route("/lab/time", post(advance_time))
        .with_state(chain)
}

impl IntoResponse for ChainError {
    fn into_response(self) -> Response {
        let status = match &self {
            ChainError::Rejected(_)
            | ChainError::BadRequest(_)
            | ChainError::InsufficientFunds(_) => StatusCode::BAD_REQUEST,
            ChainError::BlockRejected(_) | ChainError::Internal(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        (status, Json(json!({"error": self.to_string()}))).into_response()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MineRequest {
    blocks: u32,
    address: Option<String>,
}

/// Bounds one request so a typo cannot wedge the lab for minutes.
const MAX_BLOCKS_PER_REQUEST: u32 = 2_000;

async fn mine(
    State(chain): State<Chain>,
    Json(req): Json<MineRequest>,
) -> Result<Json<Value>, ChainError> {
    if req.blocks == 0 || req.blocks > MAX_BLOCKS_PER_REQUEST {
        return Err(ChainError::BadRequest(format!(
            "blocks must be between 1 and {MAX_BLOCKS_PER_REQUEST}"
        )));
    }
    let address = req.address.as_deref().map(parse_address).transpose()?;
    let hashes = chain.mine(req.blocks, address).await?;
    let hashes: Vec<String> = hashes.iter().map(|h| h.to_string()).collect();
    Ok(Json(
        json!({"hashes": hashes, "height": chain.tip_height()}),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FaucetRequest {
    address: String,
    sats: u64,
    #[serde(default = "yes")]
    confirm: bool,
}

fn yes() -> bool {
    true
}

async fn faucet(
    State(chain): State<Chain>,
    Json(req): Json<FaucetRequest>,
) -> Result<Json<Value>, ChainError> {
    let address = parse_address(&req.address)?;
    let txid = chain.faucet(&address, req.sats, req.confirm).await?;
    Ok(Json(
        json!({"txid": txid.to_string(), "height": chain.tip_height()}),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReorgRequest {
    depth: u32,
}

async fn reorg(
    State(chain): State<Chain>,
    Json(req): Json<ReorgRequest>,
) -> Result<Json<Value>, ChainError> {
    let hashes = chain.reorg(req.depth).await?;
    let hashes: Vec<String> = hashes.iter().map(|h| h.to_string()).collect();
    Ok(Json(
        json!({"hashes": hashes, "height": chain.tip_height()}),
    ))
}

async fn status(State(chain): State<Chain>) -> Json<Value> {
    let inner = chain.lock();
    Json(json!({
        "height": inner.state.tip_height(),
        "tip": inner.state.tip_hash().map(|h| h.to_string()),
        "mempool_size": inner.state.mempool.len(),
        "median_time_past": inner.state.median_time_past(inner.state.tip_height()),
        "lab_address": inner.wallet.address.to_string(),
        "lab_balance_sats": inner.wallet.balance(&inner.state),
    }))
}

async fn get_faults(State(chain): State<Chain>) -> Json<Faults> {
    Json(chain.faults().clone())
}

async fn set_faults(State(chain): State<Chain>, Json(faults): Json<Faults>) -> Json<Faults> {
    chain.set_faults(faults.clone());
    Json(faults)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TimeRequest {
    advance_secs: u32,
}

async fn advance_time(
    State(chain): State<Chain>,
    Json(req): Json<TimeRequest>,
) -> Result<Json<Value>, ChainError> {
    let offset = chain.advance_time(req.advance_secs)?;
    Ok(Json(
        json!({"offset_secs": offset, "median_time_past": chain.median_time_past()}),
    ))
}
