//! The lab's regtest chain: blocks judged by Bitcoin Core's consensus engine (`bitcoinkernel`), a mempool with
//! Core's acceptance rules, a miner, and an Esplora-compatible HTTP server for ldk-node and friends.

mod control;
mod esplora;
pub mod kernel;
pub mod mempool;
pub mod miner;
pub mod state;
pub mod wallet;

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use bitcoin::{Address, BlockHash, Network, ScriptBuf, Transaction, Txid};
use tokio_util::sync::CancellationToken;

use kernel::{ChainEvent, Kernel};
use mempool::Accepted;
use state::ChainState;
use wallet::LabWallet;

/// Maximum block weight, less room for the coinbase.
const MAX_BLOCK_TX_WEIGHT: u64 = 4_000_000 - 8_000;

#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error("transaction rejected: {0}")]
    Rejected(String),
    #[error("block rejected by consensus: {0}")]
    BlockRejected(String),
    #[error("invalid request: {0}")]
    BadRequest(String),
    #[error("the lab wallet cannot pay: {0}")]
    InsufficientFunds(String),
    #[error("chain internal error: {0}")]
    Internal(String),
}

pub(crate) struct Inner {
    kernel: Kernel,
    pub(crate) state: ChainState,
    wallet: LabWallet,
    dir: PathBuf,
    /// Makes each mined block unique, even at a height mined before (reorgs).
    counter: u64,
    /// Seconds added to the clock when stamping blocks (to test time-based locks); the kernel refuses blocks
    /// more than two hours ahead, so it is capped below that.
    time_offset: u32,
}

/// The most the lab clock may run ahead: the kernel refuses blocks more than 2 h in the future.
pub const MAX_TIME_OFFSET_SECS: u32 = 7_000;

/// A running lab chain: cheap to clone.
#[derive(Clone)]
pub struct Chain {
    inner: Arc<Mutex<Inner>>,
    url: String,
    cancel: CancellationToken,
    faults: Arc<Mutex<Faults>>,
    server: Arc<Mutex<Option<tokio::task::JoinHandle<()>>>>,
}

/// Fault injection for the Esplora face, to test how clients cope with a flaky chain source.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Answer the next `error_count` Esplora requests with this HTTP status (429, 500, 503…).
    pub error_status: Option<u16>,
    pub error_count: u32,
    /// Delay the next `delay_count` requests by `delay_ms` (above clients' timeouts to simulate a hang).
    pub delay_ms: u64,
    pub delay_count: u32,
    /// Serve `{}` from `/fee-estimates`.
    pub empty_fee_estimates: bool,
    /// 404 on `merkleblock-proof` for transactions in the newest `proof_lag_blocks` blocks (indexer lag).
    pub proof_lag_blocks: u32,
}

fn now() -> u32 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as u32)
        .unwrap_or(0)
}

/// Parses a regtest address.
pub fn parse_address(text: &str) -> Result<Address, ChainError> {
    Address::from_str(text.trim())
        .map_err(|e| ChainError::BadRequest(format!("not a bitcoin address: {e}")))?
        .require_network(Network::Regtest)
        .map_err(|e| ChainError::BadRequest(format!("not a regtest address: {e}")))
}

impl Inner {
    fn apply(&mut self, events: Vec<ChainEvent>) {
        let mut returned: Vec<Transaction> = Vec::new();
        for event in events {
            match event {
                ChainEvent::Connected { block, height } => {
                    let evicted = self.state.connect(block, height);
                    if !evicted.is_empty() {
                        tracing::info!(?evicted, "mempool transactions conflicted by a new block");
                    }
                }
                ChainEvent::Disconnected { block, .. } => {
                    returned.extend(self.state.disconnect(block.block_hash()));
                }
            }
        }
        // Transactions of dropped blocks return to the mempool unless the new chain conflicts with them.
        for tx in returned {
            let txid = tx.compute_txid();
            if let Err(reason) = mempool::accept(&mut self.state, tx) {
                tracing::info!(%txid, %reason, "transaction of a dropped block did not return to the mempool");
            }
        }
        self.persist_mempool();
    }

    fn persist_mempool(&self) {
        let mut entries: Vec<_> = self.state.mempool.values().collect();
        entries.sort_by_key(|e| e.seq);
        let hex: Vec<String> = entries
            .iter()
            .map(|e| bitcoin::consensus::encode::serialize_hex(&e.tx))
            .collect();
        let path = self.dir.join("mempool.json");
        let tmp = self.dir.join("mempool.json.tmp");
        let written = serde_json::to_vec(&hex)
            .map_err(std::io::Error::other)
            .and_then(|bytes| std::fs::write(&tmp, bytes))
            .and_then(|_| std::fs::rename(&tmp, &path));
        if let Err(e) = written {
            tracing::warn!("could not save the mempool: {e}");
        }
    }

    fn submit(&mut self, tx: Transaction) -> Result<Accepted, ChainError> {
        let accepted =
            mempool::accept(&mut self.state, tx).map_err(|r| ChainError::Rejected(r.0))?;
        if matches!(accepted, Accepted::New(_)) {
            self.persist_mempool();
        }
        Ok(accepted)
    }

    /// Mines one block on the tip with the best mempool transactions. `backdate` seconds are taken off the
    /// timestamp (a burst of blocks ends at "now" instead of running into the future).
    fn mine_one(&mut self, payout: &ScriptBuf, backdate: u32) -> Result<BlockHash, ChainError> {
        let candidates = self.state.block_candidates(MAX_BLOCK_TX_WEIGHT);
        match self.mine_with(payout, backdate, &candidates) {
            Ok(hash) => Ok(hash),
            Err(ChainError::BlockRejected(reason)) if !candidates.is_empty() => {
                // Our mempool let through something consensus refuses: drop it rather than stall the chain.
                tracing::error!(%reason, evicted = candidates.len(), "kernel refused a block template; evicting its transactions");
                for txid in &candidates {
                    self.state.remove_from_mempool(txid);
                }
                self.persist_mempool();
                self.mine_with(payout, backdate, &[])
            }
            Err(e) => Err(e),
        }
    }

    fn mine_with(
        &mut self,
        payout: &ScriptBuf,
        backdate: u32,
        txids: &[Txid],
    ) -> Result<BlockHash, ChainError> {
        let tip = self.state.tip_height();
        let prev = self
            .state
            .tip_hash()
            .ok_or_else(|| ChainError::Internal("no genesis block".into()))?;
        let transactions: Vec<Transaction> = txids
            .iter()
            .filter_map(|t| self.state.mempool.get(t).map(|e| e.tx.clone()))
            .collect();
        let fees = txids
            .iter()
            .filter_map(|t| self.state.mempool.get(t))
            .map(|e| e.fee)
            .sum();
        let time = (self.state.median_time_past(tip) + 1)
            .max((now() + self.time_offset).saturating_sub(backdate));
        self.counter += 1;
        let block = miner::assemble(miner::Template {
            prev,
            height: tip + 1,
            time,
            transactions,
            fees,
            payout: payout.clone(),
            tag: self.counter,
        });
        self.process(block)
    }

    /// Hands a block to the kernel and applies what it did. Errors if the block did not become part of a chain.
    fn process(&mut self, block: bitcoin::Block) -> Result<BlockHash, ChainError> {
        let hash = block.block_hash();
        let events = self
            .kernel
            .process_block(&block)
            .map_err(|r| ChainError::BlockRejected(r.0))?;
        let connected = events.iter().any(
            |e| matches!(e, ChainEvent::Connected { block, .. } if block.block_hash() == hash),
        );
        self.apply(events);
        if connected || self.state.blocks.contains_key(&hash) {
            return Ok(hash);
        }
        Err(ChainError::BlockRejected(
            self.kernel
                .last_rejection()
                .unwrap_or_else(|| format!("block {hash} was not connected")),
        ))
    }

    /// Builds `depth + 1` empty blocks from tip−depth; the kernel switches to them once they have more work.
    fn reorg(&mut self, depth: u32) -> Result<Vec<BlockHash>, ChainError> {
        let tip = self.state.tip_height();
        if depth == 0 || depth > tip {
            return Err(ChainError::BadRequest(format!(
                "reorg depth must be between 1 and {tip}"
            )));
        }
        let fork_height = tip - depth;
        let mut prev = self.state.best[fork_height as usize];
        let mut hashes = Vec::new();
        let mut last_time = 0;
        for height in fork_height + 1..=tip + 1 {
            let time = (self.state.median_time_past_of(prev) + 1)
                .max(now() + self.time_offset)
                .max(last_time + 1);
            last_time = time;
            self.counter += 1;
            let block = miner::assemble(miner::Template {
                prev,
                height,
                time,
                transactions: Vec::new(),
                fees: 0,
                payout: self.wallet.script.clone(),
                tag: self.counter ^ 0x5245_4f52_4700_0000,
            });
            let hash = block.block_hash();
            let events = self
                .kernel
                .process_block(&block)
                .map_err(|r| ChainError::BlockRejected(r.0))?;
            // Until the branch wins, the kernel stores its blocks without connecting them; remember them so
            // they can be served (as not in the best chain) either way.
            if events.is_empty() {
                self.state.blocks.insert(
                    hash,
                    state::BlockRecord {
                        block,
                        height,
                        in_best: false,
                        undo: Vec::new(),
                    },
                );
            }
            self.apply(events);
            hashes.push(hash);
            prev = hash;
        }
        if self.state.tip_hash() != Some(prev) {
            return Err(ChainError::Internal(
                "the competing branch did not become the best chain".into(),
            ));
        }
        Ok(hashes)
    }
}

impl Chain {
    /// Opens (or resumes) the chain stored under `dir` and serves Esplora on `listener`. Mines nothing itself.
    pub async fn start(dir: &Path, listener: tokio::net::TcpListener) -> anyhow::Result<Chain> {
        let dir = dir.to_path_buf();
        let open_dir = dir.clone();
        let inner = tokio::task::spawn_blocking(move || -> anyhow::Result<Inner> {
            std::fs::create_dir_all(&open_dir)?;
            let kernel = Kernel::open(&open_dir.join("kernel"))?;
            let wallet = LabWallet::load_or_create(&open_dir.join("lab-wallet.key"))?;
            let mut inner = Inner {
                kernel,
                state: ChainState::default(),
                wallet,
                dir: open_dir,
                counter: 0,
                time_offset: 0,
            };
            for (height, block) in inner.kernel.active_blocks()?.into_iter().enumerate() {
                inner.state.connect(block, height as u32);
            }
            inner.counter = inner.state.tip_height() as u64;
            // Resume the mempool: every transaction is checked again.
            let saved = std::fs::read(inner.dir.join("mempool.json")).ok();
            let saved: Vec<String> = saved
                .and_then(|b| serde_json::from_slice(&b).ok())
                .unwrap_or_default();
            for hex in saved {
                if let Ok(tx) = bitcoin::consensus::encode::deserialize_hex::<Transaction>(&hex) {
                    let _ = mempool::accept(&mut inner.state, tx);
                }
            }
            Ok(inner)
        })
        .await??;
        let url = format!("http://{}", listener.local_addr()?);
        let chain = Chain {
            inner: Arc::new(Mutex::new(inner)),
            url,
            cancel: CancellationToken::new(),
            faults: Arc::new(Mutex::new(Faults::default())),
            server: Arc::new(Mutex::new(None)),
        };
        let app = esplora::router(chain.clone());
        let cancel = chain.cancel.clone();
        let server = tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(cancel.cancelled_owned())
                .await;
            if let Err(e) = served {
                tracing::error!("esplora server stopped: {e}");
            }
        });
        *chain.server.lock().unwrap_or_else(|p| p.into_inner()) = Some(server);
        tracing::info!(url = %chain.url, height = chain.tip_height(), dir = %dir.display(), "lab chain serving");
        Ok(chain)
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves consistent-enough indexes for a test lab; keep serving.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    async fn blocking<R: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Inner) -> Result<R, ChainError> + Send + 'static,
    ) -> Result<R, ChainError> {
        let chain = self.clone();
        tokio::task::spawn_blocking(move || work(&mut chain.lock()))
            .await
            .map_err(|e| ChainError::Internal(e.to_string()))?
    }

    /// "http://127.0.0.1:PORT", the Esplora base URL.
    pub fn esplora_url(&self) -> String {
        self.url.clone()
    }

    pub fn tip_height(&self) -> u32 {
        self.lock().state.tip_height()
    }

    /// The lab wallet's address (where blocks pay by default).
    pub fn lab_address(&self) -> Address {
        self.lock().wallet.address.clone()
    }

    /// Mines `blocks` blocks with the best mempool transactions, paying the coinbase to `address` (default: the lab).
    pub async fn mine(
        &self,
        blocks: u32,
        address: Option<Address>,
    ) -> Result<Vec<BlockHash>, ChainError> {
        self.blocking(move |inner| {
            let payout = address
                .map(|a| a.script_pubkey())
                .unwrap_or_else(|| inner.wallet.script.clone());
            (0..blocks)
                .map(|i| inner.mine_one(&payout, blocks - 1 - i))
                .collect()
        })
        .await
    }

    /// Pays `sats` to `address` from the lab's own coins; mines one block when `confirm`.
    pub async fn faucet(
        &self,
        address: &Address,
        sats: u64,
        confirm: bool,
    ) -> Result<Txid, ChainError> {
        self.faucet_many(&[(address.clone(), sats)], confirm).await
    }

    /// Pays several outputs in one transaction (e.g. 20 UTXOs for the hub).
    pub async fn faucet_many(
        &self,
        outputs: &[(Address, u64)],
        confirm: bool,
    ) -> Result<Txid, ChainError> {
        let outputs: Vec<(ScriptBuf, u64)> = outputs
            .iter()
            .map(|(a, v)| (a.script_pubkey(), *v))
            .collect();
        self.blocking(move |inner| {
            if outputs.iter().any(|(_, v)| *v == 0) {
                return Err(ChainError::BadRequest("amount must be positive".into()));
            }
            let tx = inner
                .wallet
                .pay(&inner.state, &outputs)
                .map_err(ChainError::InsufficientFunds)?;
            let txid = inner.submit(tx)?.txid();
            if confirm {
                let payout = inner.wallet.script.clone();
                inner.mine_one(&payout, 0)?;
            }
            Ok(txid)
        })
        .await
    }

    /// Submits a raw transaction to the mempool, like `POST /tx`.
    pub async fn submit(&self, tx: Transaction) -> Result<Txid, ChainError> {
        self.blocking(move |inner| inner.submit(tx).map(|a| a.txid()))
            .await
    }

    /// Hands a block built elsewhere to the kernel (as a peer would). A block the kernel refuses is never served.
    pub async fn submit_block(&self, block: bitcoin::Block) -> Result<BlockHash, ChainError> {
        self.blocking(move |inner| inner.process(block)).await
    }

    /// A template for the next block on the tip, paying the lab, for callers that want to build their own.
    pub fn next_template(&self) -> miner::Template {
        let inner = self.lock();
        let tip = inner.state.tip_height();
        miner::Template {
            prev: inner.state.tip_hash().unwrap_or_else(|| {
                bitcoin::constants::genesis_block(Network::Regtest).block_hash()
            }),
            height: tip + 1,
            time: (inner.state.median_time_past(tip) + 1).max(now() + inner.time_offset),
            transactions: Vec::new(),
            fees: 0,
            payout: inner.wallet.script.clone(),
            tag: u64::MAX - inner.counter,
        }
    }

    /// A competing branch of `depth + 1` empty blocks from tip−depth becomes the best chain.
    pub async fn reorg(&self, depth: u32) -> Result<Vec<BlockHash>, ChainError> {
        self.blocking(move |inner| inner.reorg(depth)).await
    }

    /// Replaces the fault-injection settings of the Esplora face.
    pub fn set_faults(&self, faults: Faults) {
        *self.faults.lock().unwrap_or_else(|p| p.into_inner()) = faults;
    }

    pub(crate) fn faults(&self) -> MutexGuard<'_, Faults> {
        self.faults.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Moves the clock used to stamp new blocks forward (cumulative, capped at [`MAX_TIME_OFFSET_SECS`]).
    pub fn advance_time(&self, secs: u32) -> Result<u32, ChainError> {
        let mut inner = self.lock();
        let offset = inner.time_offset.saturating_add(secs);
        if offset > MAX_TIME_OFFSET_SECS {
            return Err(ChainError::BadRequest(format!(
                "the lab clock can run at most {MAX_TIME_OFFSET_SECS} s ahead (the kernel refuses blocks over 2 h in the future)"
            )));
        }
        inner.time_offset = offset;
        Ok(offset)
    }

    /// Median-time-past of the tip (BIP113), what time-based locks are measured against.
    pub fn median_time_past(&self) -> u32 {
        let inner = self.lock();
        inner.state.median_time_past(inner.state.tip_height())
    }

    /// Routes under `/lab/` for mining, the faucet, reorgs and chain status.
    pub fn control_router(&self) -> axum::Router {
        control::router(self.clone())
    }

    /// Stops the HTTP server and waits (up to 5 s, for clients holding keep-alive connections) until it has let go
    /// of its handle. The kernel flushes its state when the last handle is dropped.
    pub async fn shutdown(&self) {
        self.cancel.cancel();
        let server = self.server.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(server) = server {
            let abort = server.abort_handle();
            if tokio::time::timeout(std::time::Duration::from_secs(5), server)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
    }
}
