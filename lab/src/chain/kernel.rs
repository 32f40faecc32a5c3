//! Bitcoin Core's consensus engine (libbitcoinkernel) as the lab chain's judge: every block and every script the lab
//! accepts has been checked by it.

use std::path::Path;
use std::sync::{Arc, Mutex};

use bitcoin::consensus::{deserialize, serialize};
use bitcoin::{Amount, Block, ScriptBuf, Transaction, TxOut};
use bitcoinkernel::prelude::*;
use bitcoinkernel::{
    ChainType, ChainstateManager, Context, ContextBuilder, Log, Logger, PrecomputedTransactionData,
    ProcessBlockResult, VERIFY_ALL,
};

/// A change of the kernel's active chain, in the order the kernel made it.
#[derive(Debug)]
pub enum ChainEvent {
    Connected { block: Block, height: u32 },
    Disconnected { block: Block, height: u32 },
}

/// Why the kernel refused a block.
#[derive(Debug, Clone)]
pub struct BlockRejected(pub String);

/// Kernel log lines go to tracing; the last validation complaint is kept to explain a rejection.
struct KernelLog {
    last_error: Arc<Mutex<Option<String>>>,
}

impl Log for KernelLog {
    fn log(&self, message: &str) {
        let line = message.trim();
        tracing::debug!(target: "bitcoinkernel", "{line}");
        let lower = line.to_ascii_lowercase();
        if lower.contains("invalid") || lower.contains("failed") || lower.contains("error") {
            if let Ok(mut last) = self.last_error.lock() {
                *last = Some(line.to_string());
            }
        }
    }
}

/// Keeps the kernel's log connection alive. Core's logger is a process-wide object guarded by its own mutex, so
/// the handle may move between threads; we only ever drop it.
struct KernelLogger(#[allow(dead_code)] Logger);
// SAFETY: the connection handle is only destroyed, and Core's BCLog::Logger synchronises internally.
unsafe impl Send for KernelLogger {}
unsafe impl Sync for KernelLogger {}

/// The kernel's chainstate for the lab's regtest chain, stored under a directory.
pub struct Kernel {
    // Field order matters: the chainstate manager must be dropped before its context.
    chainman: ChainstateManager,
    _context: Context,
    _logger: Option<KernelLogger>,
    events: Arc<Mutex<Vec<ChainEvent>>>,
    last_error: Arc<Mutex<Option<String>>>,
}

fn to_bitcoin_block(block: &bitcoinkernel::Block) -> Option<Block> {
    let bytes = block.consensus_encode().ok()?;
    deserialize(&bytes).ok()
}

impl Kernel {
    /// Opens (or creates) the regtest chainstate under `dir`.
    pub fn open(dir: &Path) -> anyhow::Result<Kernel> {
        std::fs::create_dir_all(dir)?;
        let last_error = Arc::new(Mutex::new(None));
        let logger = Logger::new(KernelLog {
            last_error: last_error.clone(),
        })
        .ok()
        .map(KernelLogger);
        let events: Arc<Mutex<Vec<ChainEvent>>> = Arc::new(Mutex::new(Vec::new()));
        let on_connect = events.clone();
        let on_disconnect = events.clone();
        let context = ContextBuilder::new()
            .chain_type(ChainType::Regtest)
            .validation(move |registry| {
                registry.register_block_connected(
                    move |block: bitcoinkernel::Block, entry: bitcoinkernel::BlockTreeEntry<'_>| {
                        if let (Some(block), Ok(mut queue)) =
                            (to_bitcoin_block(&block), on_connect.lock())
                        {
                            queue.push(ChainEvent::Connected {
                                block,
                                height: entry.height() as u32,
                            });
                        }
                    },
                );
                registry.register_block_disconnected(
                    move |block: bitcoinkernel::Block, entry: bitcoinkernel::BlockTreeEntry<'_>| {
                        if let (Some(block), Ok(mut queue)) =
                            (to_bitcoin_block(&block), on_disconnect.lock())
                        {
                            queue.push(ChainEvent::Disconnected {
                                block,
                                height: entry.height() as u32,
                            });
                        }
                    },
                );
            })
            .build()
            .map_err(|e| anyhow::anyhow!("bitcoinkernel context: {e}"))?;
        let data_dir = dir.join("chainstate");
        let blocks_dir = dir.join("blocks");
        let chainman = ChainstateManager::new(
            &context,
            &data_dir.to_string_lossy(),
            &blocks_dir.to_string_lossy(),
        )
        .map_err(|e| anyhow::anyhow!("bitcoinkernel chainstate under {}: {e}", dir.display()))?;
        chainman
            .import_blocks()
            .map_err(|e| anyhow::anyhow!("bitcoinkernel import: {e}"))?;
        let kernel = Kernel {
            chainman,
            _context: context,
            _logger: logger,
            events,
            last_error,
        };
        // Anything the kernel announced while loading is already on disk; the caller reads the active chain instead.
        kernel.take_events();
        Ok(kernel)
    }

    fn take_events(&self) -> Vec<ChainEvent> {
        self.events
            .lock()
            .map(|mut q| std::mem::take(&mut *q))
            .unwrap_or_default()
    }

    /// Hands a block to the kernel. Returns the chain changes it caused (possibly none: a valid block on a
    /// shorter branch), or the kernel's reason for refusing it.
    pub fn process_block(&self, block: &Block) -> Result<Vec<ChainEvent>, BlockRejected> {
        if let Ok(mut last) = self.last_error.lock() {
            *last = None;
        }
        let bytes = serialize(block);
        let kernel_block = bitcoinkernel::Block::new(&bytes)
            .map_err(|e| BlockRejected(format!("kernel could not parse block: {e}")))?;
        let result = self.chainman.process_block(&kernel_block);
        let events = self.take_events();
        match result {
            ProcessBlockResult::Rejected => {
                let reason = self
                    .last_error
                    .lock()
                    .ok()
                    .and_then(|l| l.clone())
                    .unwrap_or_else(|| "block rejected by consensus".to_string());
                Err(BlockRejected(reason))
            }
            // Stored is not connected: a block can pass AcceptBlock and still fail ConnectBlock. Callers check
            // the events for their block and use `last_rejection` to explain a block that did not connect.
            ProcessBlockResult::NewBlock | ProcessBlockResult::Duplicate => Ok(events),
        }
    }

    /// The kernel's last validation complaint, if any since the last `process_block`.
    pub fn last_rejection(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|l| l.clone())
    }

    pub fn active_height(&self) -> u32 {
        self.chainman.active_chain().height().max(0) as u32
    }

    /// Reads the active chain from genesis to tip, as stored by the kernel.
    pub fn active_blocks(&self) -> anyhow::Result<Vec<Block>> {
        let chain = self.chainman.active_chain();
        let mut blocks = Vec::new();
        for entry in chain.iter() {
            let block = self
                .chainman
                .read_block_data(&entry)
                .map_err(|e| anyhow::anyhow!("reading block at height {}: {e}", entry.height()))?;
            blocks.push(
                to_bitcoin_block(&block).ok_or_else(|| anyhow::anyhow!("undecodable block"))?,
            );
        }
        Ok(blocks)
    }
}

/// Verifies every input script of `tx` with Bitcoin Core's interpreter and all consensus flags
/// (P2SH, DERSIG, NULLDUMMY, CLTV, CSV, WITNESS, TAPROOT).
pub fn verify_scripts(tx: &Transaction, spent: &[TxOut]) -> Result<(), String> {
    let bytes = serialize(tx);
    let kernel_tx = bitcoinkernel::Transaction::new(&bytes)
        .map_err(|e| format!("kernel could not parse tx: {e}"))?;
    let outputs: Vec<bitcoinkernel::TxOut> = spent
        .iter()
        .map(|o| kernel_txout(&o.script_pubkey, o.value))
        .collect::<Result<_, _>>()?;
    let precomputed =
        PrecomputedTransactionData::new(&kernel_tx, &outputs).map_err(|e| e.to_string())?;
    for (index, out) in outputs.iter().enumerate() {
        bitcoinkernel::verify(
            &out.script_pubkey(),
            Some(out.value()),
            &kernel_tx,
            index,
            Some(VERIFY_ALL),
            &precomputed,
        )
        .map_err(|e| format!("mandatory-script-verify-flag-failed (input {index}: {e})"))?;
    }
    Ok(())
}

fn kernel_txout(script: &ScriptBuf, value: Amount) -> Result<bitcoinkernel::TxOut, String> {
    let spk = bitcoinkernel::ScriptPubkey::new(script.as_bytes()).map_err(|e| e.to_string())?;
    Ok(bitcoinkernel::TxOut::new(&spk, value.to_sat() as i64))
}
