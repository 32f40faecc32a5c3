//! The Esplora HTTP API over the lab chain, byte-compatible with what ldk-node 0.7 (bdk_esplora,
//! lightning-transaction-sync, esplora-client) reads.

use std::str::FromStr;

use axum::body::Bytes;
use axum::extract::Request;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bitcoin::consensus::encode::{deserialize_hex, serialize, serialize_hex};
use bitcoin::merkle_tree::MerkleBlock;
use bitcoin::{BlockHash, OutPoint, Transaction, Txid};
use serde_json::{json, Value};

use super::state::{BlockRecord, ChainState, TxLocation};
use super::{Chain, ChainError};

/// Esplora pages: up to 50 mempool transactions, then 25 confirmed ones.
const MEMPOOL_PAGE: usize = 50;
const CHAIN_PAGE: usize = 25;

pub fn router(chain: Chain) -> Router {
    Router::new()
        .route("/blocks", get(blocks_latest))
        .route("/blocks/{start}", get(blocks_from))
        .route("/blocks/tip/hash", get(tip_hash))
        .route("/blocks/tip/height", get(tip_height))
        .route("/block-height/{height}", get(block_at_height))
        .route("/block/{hash}", get(block_info))
        .route("/block/{hash}/header", get(block_header))
        .route("/block/{hash}/status", get(block_status))
        .route("/block/{hash}/raw", get(block_raw))
        .route("/block/{hash}/txids", get(block_txids))
        .route("/scripthash/{sh}/txs", get(scripthash_txs))
        .route("/scripthash/{sh}/txs/chain", get(scripthash_chain_first))
        .route(
            "/scripthash/{sh}/txs/chain/{last}",
            get(scripthash_chain_after),
        )
        .route("/scripthash/{sh}/txs/mempool", get(scripthash_mempool))
        .route("/tx", post(broadcast))
        .route("/tx/{txid}", get(tx_json))
        .route("/tx/{txid}/raw", get(tx_raw))
        .route("/tx/{txid}/hex", get(tx_hex))
        .route("/tx/{txid}/status", get(tx_status))
        .route("/tx/{txid}/outspend/{vout}", get(tx_outspend))
        .route("/tx/{txid}/outspends", get(tx_outspends))
        .route("/tx/{txid}/merkleblock-proof", get(tx_merkleblock_proof))
        .route("/fee-estimates", get(fee_estimates))
        .route("/mempool/txids", get(mempool_txids))
        .layer(axum::middleware::from_fn_with_state(
            chain.clone(),
            inject_faults,
        ))
        .with_state(chain)
}

/// Applies the fault-injection switches set through `/lab/faults` before a request is served.
async fn inject_faults(State(chain): State<Chain>, request: Request, next: Next) -> Response {
    let (status, delay) = {
        let mut faults = chain.faults();
        let status = match faults.error_status {
            Some(code) if faults.error_count > 0 => {
                faults.error_count -= 1;
                StatusCode::from_u16(code).ok()
            }
            _ => None,
        };
        let delay = (faults.delay_count > 0).then(|| {
            faults.delay_count -= 1;
            faults.delay_ms
        });
        (status, delay)
    };
    if let Some(ms) = delay {
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    }
    if let Some(status) = status {
        let mut response = (status, "injected fault").into_response();
        if status == StatusCode::TOO_MANY_REQUESTS {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        }
        return response;
    }
    next.run(request).await
}

/// An Esplora-style error response: status and a plain-text reason.
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, self.1).into_response()
    }
}

fn not_found(what: &str) -> ApiError {
    ApiError(StatusCode::NOT_FOUND, format!("{what} not found"))
}

fn bad(what: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, what.into())
}

fn parse_txid(text: &str) -> Result<Txid, ApiError> {
    Txid::from_str(text).map_err(|_| bad("Invalid hex string"))
}

fn parse_block_hash(text: &str) -> Result<BlockHash, ApiError> {
    BlockHash::from_str(text).map_err(|_| bad("Invalid hex string"))
}

fn text(body: String) -> Response {
    ([(header::CONTENT_TYPE, "text/plain")], body).into_response()
}

fn block_info_json(state: &ChainState, hash: &BlockHash) -> Option<Value> {
    let record = state.blocks.get(hash)?;
    let block = &record.block;
    let header = &block.header;
    let prev = (record.height > 0).then(|| header.prev_blockhash.to_string());
    let mediantime = if record.in_best {
        state.median_time_past(record.height)
    } else {
        state.median_time_past_of(*hash)
    };
    Some(json!({
        "id": hash.to_string(),
        "height": record.height,
        "version": header.version.to_consensus(),
        "timestamp": header.time,
        "tx_count": block.txdata.len(),
        "size": serialize(block).len(),
        "weight": block.weight().to_wu(),
        "merkle_root": header.merkle_root.to_string(),
        "previousblockhash": prev,
        "mediantime": mediantime,
        "nonce": header.nonce,
        "bits": header.bits.to_consensus(),
        "difficulty": header.difficulty_float(),
    }))
}

fn status_json(state: &ChainState, txid: &Txid) -> Option<Value> {
    Some(match state.locate(txid)? {
        TxLocation::Confirmed { block, height, .. } => json!({
            "confirmed": true,
            "block_height": height,
            "block_hash": block.to_string(),
            "block_time": state.blocks.get(&block).map(|b| b.block.header.time),
        }),
        TxLocation::Mempool => json!({"confirmed": false}),
    })
}

fn tx_to_json(state: &ChainState, tx: &Transaction) -> Value {
    let txid = tx.compute_txid();
    let mut in_total = 0u64;
    let vin: Vec<Value> = tx
        .input
        .iter()
        .map(|input| {
            let coinbase = tx.is_coinbase();
            let prevout = if coinbase {
                None
            } else {
                state.previous_output(&input.previous_output)
            };
            if let Some(p) = &prevout {
                in_total += p.value.to_sat();
            }
            json!({
                "txid": input.previous_output.txid.to_string(),
                "vout": input.previous_output.vout,
                "prevout": prevout.map(|p| json!({
                    "scriptpubkey": p.script_pubkey.to_hex_string(),
                    "value": p.value.to_sat(),
                })),
                "scriptsig": input.script_sig.to_hex_string(),
                "witness": input.witness.iter().map(hex::encode).collect::<Vec<_>>(),
                "sequence": input.sequence.0,
                "is_coinbase": coinbase,
            })
        })
        .collect();
    let out_total: u64 = tx.output.iter().map(|o| o.value.to_sat()).sum();
    json!({
        "txid": txid.to_string(),
        "version": tx.version.0,
        "locktime": tx.lock_time.to_consensus_u32(),
        "size": tx.total_size(),
        "weight": tx.weight().to_wu(),
        "fee": if tx.is_coinbase() { 0 } else { in_total.saturating_sub(out_total) },
        "vin": vin,
        "vout": tx.output.iter().map(|o| json!({
            "scriptpubkey": o.script_pubkey.to_hex_string(),
            "value": o.value.to_sat(),
        })).collect::<Vec<_>>(),
        "status": status_json(state, &txid).unwrap_or(json!({"confirmed": false})),
    })
}

async fn blocks_latest(State(chain): State<Chain>) -> Json<Value> {
    let tip = chain.tip_height();
    blocks_list(&chain, tip)
}

async fn blocks_from(
    State(chain): State<Chain>,
    Path(start): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let start: u32 = start.parse().map_err(|_| bad("invalid height"))?;
    Ok(blocks_list(&chain, start.min(chain.tip_height())))
}

fn blocks_list(chain: &Chain, from: u32) -> Json<Value> {
    let inner = chain.lock();
    let state = &inner.state;
    let list: Vec<Value> = (0..=from)
        .rev()
        .take(10)
        .filter_map(|h| {
            state
                .best
                .get(h as usize)
                .and_then(|hash| block_info_json(state, hash))
        })
        .collect();
    Json(Value::Array(list))
}

async fn tip_hash(State(chain): State<Chain>) -> Result<Response, ApiError> {
    let hash = chain
        .lock()
        .state
        .tip_hash()
        .ok_or_else(|| not_found("tip"))?;
    Ok(text(hash.to_string()))
}

async fn tip_height(State(chain): State<Chain>) -> Response {
    text(chain.tip_height().to_string())
}

async fn block_at_height(
    State(chain): State<Chain>,
    Path(height): Path<String>,
) -> Result<Response, ApiError> {
    let height: usize = height.parse().map_err(|_| bad("invalid height"))?;
    let hash = chain
        .lock()
        .state
        .best
        .get(height)
        .copied()
        .ok_or_else(|| not_found("Block"))?;
    Ok(text(hash.to_string()))
}

/// Runs `f` on a block the chain knows (best chain or stale), or answers 404.
fn with_block<R>(
    chain: &Chain,
    hash: &str,
    f: impl FnOnce(&ChainState, &BlockRecord) -> R,
) -> Result<R, ApiError> {
    let hash = parse_block_hash(hash)?;
    let inner = chain.lock();
    let record = inner
        .state
        .blocks
        .get(&hash)
        .ok_or_else(|| not_found("Block"))?;
    Ok(f(&inner.state, record))
}

fn binary(bytes: Vec<u8>) -> Response {
    ([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response()
}

async fn block_info(
    State(chain): State<Chain>,
    Path(hash): Path<String>,
) -> Result<Json<Value>, ApiError> {
    with_block(&chain, &hash, |state, record| {
        block_info_json(state, &record.block.block_hash())
    })?
    .map(Json)
    .ok_or_else(|| not_found("Block"))
}

async fn block_header(
    State(chain): State<Chain>,
    Path(hash): Path<String>,
) -> Result<Response, ApiError> {
    with_block(&chain, &hash, |_, record| {
        text(serialize_hex(&record.block.header))
    })
}

async fn block_status(
    State(chain): State<Chain>,
    Path(hash): Path<String>,
) -> Result<Json<Value>, ApiError> {
    with_block(&chain, &hash, |state, record| {
        Json(if record.in_best {
            let next = state
                .best
                .get(record.height as usize + 1)
                .map(|h| h.to_string());
            json!({"in_best_chain": true, "height": record.height, "next_best": next})
        } else {
            json!({"in_best_chain": false})
        })
    })
}

async fn block_raw(
    State(chain): State<Chain>,
    Path(hash): Path<String>,
) -> Result<Response, ApiError> {
    with_block(&chain, &hash, |_, record| binary(serialize(&record.block)))
}

async fn block_txids(
    State(chain): State<Chain>,
    Path(hash): Path<String>,
) -> Result<Json<Value>, ApiError> {
    with_block(&chain, &hash, |_, record| {
        let ids: Vec<String> = record
            .block
            .txdata
            .iter()
            .map(|t| t.compute_txid().to_string())
            .collect();
        Json(json!(ids))
    })
}

fn parse_scripthash(text: &str) -> Result<[u8; 32], ApiError> {
    let bytes = hex::decode(text).map_err(|_| bad("Invalid hex string"))?;
    bytes.try_into().map_err(|_| bad("Invalid scripthash"))
}

/// Transactions touching a script: mempool ones (oldest first), and confirmed ones newest first.
fn history(state: &ChainState, sh: &[u8; 32]) -> (Vec<Txid>, Vec<Txid>) {
    let Some(set) = state.history.get(sh) else {
        return (Vec::new(), Vec::new());
    };
    let mut mempool: Vec<(u64, Txid)> = Vec::new();
    let mut confirmed: Vec<(u32, usize, Txid)> = Vec::new();
    for txid in set {
        match state.locate(txid) {
            Some(TxLocation::Confirmed {
                height, position, ..
            }) => confirmed.push((height, position, *txid)),
            Some(TxLocation::Mempool) => mempool.push((state.mempool[txid].seq, *txid)),
            None => {}
        }
    }
    mempool.sort();
    confirmed.sort_by_key(|c| std::cmp::Reverse((c.0, c.1)));
    (
        mempool.into_iter().map(|m| m.1).collect(),
        confirmed.into_iter().map(|c| c.2).collect(),
    )
}

fn txs_json(state: &ChainState, txids: impl Iterator<Item = Txid>) -> Json<Value> {
    let list: Vec<Value> = txids
        .filter_map(|t| state.transaction(&t).map(|tx| tx_to_json(state, tx)))
        .collect();
    Json(Value::Array(list))
}

async fn scripthash_txs(
    State(chain): State<Chain>,
    Path(sh): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let sh = parse_scripthash(&sh)?;
    let inner = chain.lock();
    let (mempool, confirmed) = history(&inner.state, &sh);
    let page = mempool
        .into_iter()
        .take(MEMPOOL_PAGE)
        .chain(confirmed.into_iter().take(CHAIN_PAGE));
    Ok(txs_json(&inner.state, page))
}

async fn scripthash_chain_first(
    State(chain): State<Chain>,
    Path(sh): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let sh = parse_scripthash(&sh)?;
    let inner = chain.lock();
    let (_, confirmed) = history(&inner.state, &sh);
    Ok(txs_json(
        &inner.state,
        confirmed.into_iter().take(CHAIN_PAGE),
    ))
}

async fn scripthash_chain_after(
    State(chain): State<Chain>,
    Path((sh, last)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let sh = parse_scripthash(&sh)?;
    let last = parse_txid(&last)?;
    let inner = chain.lock();
    let (_, confirmed) = history(&inner.state, &sh);
    let after = confirmed
        .iter()
        .position(|t| *t == last)
        .map(|p| p + 1)
        .unwrap_or(confirmed.len());
    Ok(txs_json(
        &inner.state,
        confirmed.into_iter().skip(after).take(CHAIN_PAGE),
    ))
}

async fn scripthash_mempool(
    State(chain): State<Chain>,
    Path(sh): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let sh = parse_scripthash(&sh)?;
    let inner = chain.lock();
    let (mempool, _) = history(&inner.state, &sh);
    Ok(txs_json(
        &inner.state,
        mempool.into_iter().take(MEMPOOL_PAGE),
    ))
}

async fn broadcast(State(chain): State<Chain>, body: Bytes) -> Result<Response, ApiError> {
    let hex = String::from_utf8_lossy(&body).trim().to_string();
    let tx: Transaction =
        deserialize_hex(&hex).map_err(|e| bad(format!("TX decode failed: {e}")))?;
    match chain.submit(tx).await {
        Ok(txid) => Ok(text(txid.to_string())),
        Err(ChainError::Rejected(reason)) => Err(bad(format!(
            "sendrawtransaction RPC error: {}",
            json!({"code": -26, "message": reason})
        ))),
        Err(e) => Err(ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
    }
}

/// Runs `f` on a transaction of the best chain or the mempool, or answers 404.
fn with_tx<R>(
    chain: &Chain,
    txid: &str,
    f: impl FnOnce(&ChainState, Txid, &Transaction) -> R,
) -> Result<R, ApiError> {
    let txid = parse_txid(txid)?;
    let inner = chain.lock();
    let tx = inner
        .state
        .transaction(&txid)
        .ok_or_else(|| not_found("Transaction"))?;
    Ok(f(&inner.state, txid, tx))
}

async fn tx_json(
    State(chain): State<Chain>,
    Path(txid): Path<String>,
) -> Result<Json<Value>, ApiError> {
    with_tx(&chain, &txid, |state, _, tx| Json(tx_to_json(state, tx)))
}

async fn tx_raw(
    State(chain): State<Chain>,
    Path(txid): Path<String>,
) -> Result<Response, ApiError> {
    with_tx(&chain, &txid, |_, _, tx| binary(serialize(tx)))
}

async fn tx_hex(
    State(chain): State<Chain>,
    Path(txid): Path<String>,
) -> Result<Response, ApiError> {
    with_tx(&chain, &txid, |_, _, tx| text(serialize_hex(tx)))
}

async fn tx_status(
    State(chain): State<Chain>,
    Path(txid): Path<String>,
) -> Result<Json<Value>, ApiError> {
    with_tx(&chain, &txid, |state, txid, _| status_json(state, &txid))?
        .map(Json)
        .ok_or_else(|| not_found("Transaction"))
}

fn outspend_json(state: &ChainState, outpoint: &OutPoint) -> Value {
    let spender = state
        .spends
        .get(outpoint)
        .or_else(|| state.mempool_spends.get(outpoint));
    match spender {
        Some((txid, vin)) => json!({
            "spent": true,
            "txid": txid.to_string(),
            "vin": vin,
            "status": status_json(state, txid),
        }),
        None => json!({"spent": false}),
    }
}

async fn tx_outspend(
    State(chain): State<Chain>,
    Path((txid, vout)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let vout: u32 = vout.parse().map_err(|_| bad("invalid vout"))?;
    with_tx(&chain, &txid, |state, txid, tx| {
        ((vout as usize) < tx.output.len())
            .then(|| Json(outspend_json(state, &OutPoint { txid, vout })))
    })?
    .ok_or_else(|| not_found("Output"))
}

async fn tx_outspends(
    State(chain): State<Chain>,
    Path(txid): Path<String>,
) -> Result<Json<Value>, ApiError> {
    with_tx(&chain, &txid, |state, txid, tx| {
        let list: Vec<Value> = (0..tx.output.len() as u32)
            .map(|vout| outspend_json(state, &OutPoint { txid, vout }))
            .collect();
        Json(Value::Array(list))
    })
}

async fn tx_merkleblock_proof(
    State(chain): State<Chain>,
    Path(txid): Path<String>,
) -> Result<Response, ApiError> {
    let txid = parse_txid(&txid)?;
    let inner = chain.lock();
    let Some(TxLocation::Confirmed { block, height, .. }) = inner.state.locate(&txid) else {
        return Err(not_found("Transaction"));
    };
    let lag = chain.faults().proof_lag_blocks;
    if lag > 0 && height + lag > inner.state.tip_height() {
        return Err(not_found("Transaction"));
    }
    let record = inner
        .state
        .blocks
        .get(&block)
        .ok_or_else(|| not_found("Block"))?;
    let proof = MerkleBlock::from_block_with_predicate(&record.block, |t| *t == txid);
    Ok(text(serialize_hex(&proof)))
}

/// Fee estimates from the mempool: the feerate at the edge of the first `target` blocks' worth of weight,
/// never below 1 sat/vB (an empty regtest mempool estimates 1 everywhere).
async fn fee_estimates(State(chain): State<Chain>) -> Json<Value> {
    if chain.faults().empty_fee_estimates {
        return Json(json!({}));
    }
    let inner = chain.lock();
    let mut rates: Vec<(f64, u64)> = inner
        .state
        .mempool
        .values()
        .map(|e| (e.feerate(), e.tx.weight().to_wu()))
        .collect();
    rates.sort_by(|a, b| b.0.total_cmp(&a.0));
    let mut estimates = serde_json::Map::new();
    for target in [1u64, 2, 3, 4, 5, 6, 10, 12, 20, 25, 144, 504, 1008] {
        let capacity = target * 4_000_000;
        let mut used = 0u64;
        let mut edge = 1.0f64;
        for (rate, weight) in &rates {
            used += weight;
            if used > capacity {
                edge = rate.max(1.0);
                break;
            }
        }
        estimates.insert(target.to_string(), json!(edge));
    }
    Json(Value::Object(estimates))
}

async fn mempool_txids(State(chain): State<Chain>) -> Json<Value> {
    let inner = chain.lock();
    let ids: Vec<String> = inner.state.mempool.keys().map(|t| t.to_string()).collect();
    Json(json!(ids))
}
