//! Mempool acceptance: the checks a Bitcoin Core node makes before relaying a transaction, with script
//! verification done by the kernel itself.

use bitcoin::{Transaction, TxOut, Txid};

use super::kernel::verify_scripts;
use super::state::ChainState;

/// Coinbase outputs may be spent only this many blocks after their own.
pub const COINBASE_MATURITY: u32 = 100;
const LOCKTIME_THRESHOLD: u32 = 500_000_000;
const SEQUENCE_FINAL: u32 = 0xffff_ffff;
const SEQUENCE_DISABLE_FLAG: u32 = 1 << 31;
const SEQUENCE_TYPE_FLAG: u32 = 1 << 22;
const SEQUENCE_MASK: u32 = 0x0000_ffff;
const MAX_STANDARD_WEIGHT: u64 = 400_000;
const MAX_MONEY: u64 = 21_000_000 * 100_000_000;

/// Why a transaction was refused, in Bitcoin Core's words where it has some.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Rejection(pub String);

fn reject<T>(reason: impl Into<String>) -> Result<T, Rejection> {
    Err(Rejection(reason.into()))
}

/// What accepting a transaction did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted {
    New(Txid),
    /// Already in the mempool or confirmed: a rebroadcast, answered like a success.
    AlreadyKnown(Txid),
}

impl Accepted {
    pub fn txid(&self) -> Txid {
        match self {
            Accepted::New(t) | Accepted::AlreadyKnown(t) => *t,
        }
    }
}

struct Coin {
    txout: TxOut,
    height: u32,
    coinbase: bool,
}

/// Validates `tx` against the best chain and mempool and, if it passes, adds it to the mempool.
pub fn accept(state: &mut ChainState, tx: Transaction) -> Result<Accepted, Rejection> {
    let txid = tx.compute_txid();
    if state.mempool.contains_key(&txid) || state.txs.contains_key(&txid) {
        return Ok(Accepted::AlreadyKnown(txid));
    }
    if tx.input.is_empty() {
        return reject("bad-txns-vin-empty");
    }
    if tx.output.is_empty() {
        return reject("bad-txns-vout-empty");
    }
    if tx.is_coinbase() {
        return reject("coinbase");
    }
    if tx.base_size() < 65 {
        return reject("tx-size-small");
    }
    if tx.weight().to_wu() > MAX_STANDARD_WEIGHT {
        return reject("tx-size");
    }
    let mut out_total: u64 = 0;
    for output in &tx.output {
        out_total = out_total.saturating_add(output.value.to_sat());
        if output.value.to_sat() > MAX_MONEY || out_total > MAX_MONEY {
            return reject("bad-txns-txouttotal-toolarge");
        }
    }
    let mut seen = std::collections::HashSet::new();
    if !tx.input.iter().all(|i| seen.insert(i.previous_output)) {
        return reject("bad-txns-inputs-duplicate");
    }

    let next_height = state.tip_height() + 1;
    let tip_mtp = state.median_time_past(state.tip_height());
    let mut coins = Vec::with_capacity(tx.input.len());
    for input in &tx.input {
        let outpoint = input.previous_output;
        if let Some((other, _)) = state.mempool_spends.get(&outpoint) {
            return reject(format!(
                "txn-mempool-conflict (input {outpoint} already spent by {other})"
            ));
        }
        if let Some(utxo) = state.utxos.get(&outpoint) {
            coins.push(Coin {
                txout: utxo.txout.clone(),
                height: utxo.height,
                coinbase: utxo.coinbase,
            });
        } else if let Some(parent) = state.mempool.get(&outpoint.txid) {
            match parent.tx.output.get(outpoint.vout as usize) {
                Some(txout) => coins.push(Coin {
                    txout: txout.clone(),
                    height: next_height,
                    coinbase: false,
                }),
                None => return reject(format!("bad-txns-inputs-missingorspent ({outpoint})")),
            }
        } else {
            return reject(format!("bad-txns-inputs-missingorspent ({outpoint})"));
        }
    }

    for coin in &coins {
        if coin.coinbase && next_height - coin.height < COINBASE_MATURITY {
            return reject(format!(
                "bad-txns-premature-spend-of-coinbase (tried to spend coinbase at depth {})",
                next_height - coin.height
            ));
        }
    }
    let in_total: u64 = coins.iter().map(|c| c.txout.value.to_sat()).sum();
    if in_total < out_total {
        return reject(format!(
            "bad-txns-in-belowout (value in {in_total} < value out {out_total})"
        ));
    }
    let fee = in_total - out_total;
    let vsize = tx.vsize() as u64;
    if fee < vsize {
        return reject(format!("min relay fee not met ({fee} < {vsize})"));
    }

    if !is_final(&tx, next_height, tip_mtp) {
        return reject("non-final");
    }
    if !sequence_locks_satisfied(state, &tx, &coins, next_height, tip_mtp) {
        return reject("non-BIP68-final");
    }

    let spent: Vec<TxOut> = coins.into_iter().map(|c| c.txout).collect();
    verify_scripts(&tx, &spent).map_err(Rejection)?;
    Ok(Accepted::New(state.insert_mempool(tx, fee, spent)))
}

/// Absolute lock time (nLockTime) against the height of the next block and the tip's median-time-past.
fn is_final(tx: &Transaction, next_height: u32, tip_mtp: u32) -> bool {
    let lock = tx.lock_time.to_consensus_u32();
    if lock == 0 {
        return true;
    }
    let cutoff = if lock < LOCKTIME_THRESHOLD {
        next_height
    } else {
        tip_mtp
    };
    lock < cutoff || tx.input.iter().all(|i| i.sequence.0 == SEQUENCE_FINAL)
}

/// BIP68 relative lock times, measured like Core: heights against the next block, times by BIP113
/// median-time-past of the block before the coin's block.
fn sequence_locks_satisfied(
    state: &ChainState,
    tx: &Transaction,
    coins: &[Coin],
    next_height: u32,
    tip_mtp: u32,
) -> bool {
    if tx.version.0 < 2 {
        return true;
    }
    for (input, coin) in tx.input.iter().zip(coins) {
        let sequence = input.sequence.0;
        if sequence & SEQUENCE_DISABLE_FLAG != 0 {
            continue;
        }
        let value = sequence & SEQUENCE_MASK;
        if sequence & SEQUENCE_TYPE_FLAG != 0 {
            let base = if coin.height >= next_height {
                tip_mtp
            } else {
                state.median_time_past(coin.height.saturating_sub(1))
            };
            let min_time = (base as i64) + ((value as i64) << 9) - 1;
            if min_time >= tip_mtp as i64 {
                return false;
            }
        } else {
            let min_height = coin.height as i64 + value as i64 - 1;
            if min_height >= next_height as i64 {
                return false;
            }
        }
    }
    true
}
