//! The lab chain's indexes (best chain, UTXO set, transactions, spends, script histories) and its mempool,
//! kept in step with the kernel's connect/disconnect notifications.

use std::collections::{HashMap, HashSet};

use bitcoin::hashes::{sha256, Hash};
use bitcoin::{Block, BlockHash, OutPoint, Script, Transaction, TxOut, Txid};

/// An unspent output and where it was created.
#[derive(Debug, Clone)]
pub struct Utxo {
    pub txout: TxOut,
    pub height: u32,
    pub coinbase: bool,
}

/// A block the lab has seen connected at least once.
#[derive(Debug, Clone)]
pub struct BlockRecord {
    pub block: Block,
    pub height: u32,
    pub in_best: bool,
    /// Outputs this block spent, to restore them when it is disconnected.
    pub undo: Vec<(OutPoint, Utxo)>,
}

/// A transaction waiting in the mempool.
#[derive(Debug, Clone)]
pub struct MempoolEntry {
    pub tx: Transaction,
    pub fee: u64,
    pub vsize: u64,
    /// The outputs it spends, in input order.
    pub spent: Vec<TxOut>,
    /// Arrival order, for stable listings.
    pub seq: u64,
}

impl MempoolEntry {
    pub fn feerate(&self) -> f64 {
        self.fee as f64 / self.vsize.max(1) as f64
    }
}

/// Where a transaction is, as Esplora reports it.
#[derive(Debug, Clone, Copy)]
pub enum TxLocation {
    Confirmed {
        block: BlockHash,
        height: u32,
        position: usize,
    },
    Mempool,
}

/// Esplora's script hash: sha256 of the script, natural byte order.
pub fn script_hash(script: &Script) -> [u8; 32] {
    sha256::Hash::hash(script.as_bytes()).to_byte_array()
}

#[derive(Default)]
pub struct ChainState {
    pub blocks: HashMap<BlockHash, BlockRecord>,
    /// Best chain, index = height.
    pub best: Vec<BlockHash>,
    pub txs: HashMap<Txid, (BlockHash, usize)>,
    pub utxos: HashMap<OutPoint, Utxo>,
    /// Spends confirmed on the best chain: outpoint → (spending txid, input index).
    pub spends: HashMap<OutPoint, (Txid, u32)>,
    pub mempool: HashMap<Txid, MempoolEntry>,
    pub mempool_spends: HashMap<OutPoint, (Txid, u32)>,
    /// Script hash → transactions touching it (best chain and mempool).
    pub history: HashMap<[u8; 32], HashSet<Txid>>,
    pub mempool_seq: u64,
}

impl ChainState {
    pub fn tip_height(&self) -> u32 {
        self.best.len().saturating_sub(1) as u32
    }

    pub fn tip_hash(&self) -> Option<BlockHash> {
        self.best.last().copied()
    }

    pub fn block_at(&self, height: u32) -> Option<&BlockRecord> {
        self.best
            .get(height as usize)
            .and_then(|h| self.blocks.get(h))
    }

    /// BIP113 median-time-past of the block at `height` on the best chain (median of it and its 10 ancestors).
    pub fn median_time_past(&self, height: u32) -> u32 {
        let from = height.saturating_sub(10);
        let mut times: Vec<u32> = (from..=height)
            .filter_map(|h| self.block_at(h).map(|b| b.block.header.time))
            .collect();
        times.sort_unstable();
        times.get(times.len() / 2).copied().unwrap_or(0)
    }

    /// Median-time-past of the chain ending at `hash` (for building a competing branch).
    pub fn median_time_past_of(&self, hash: BlockHash) -> u32 {
        let mut times = Vec::new();
        let mut cursor = Some(hash);
        while let Some(h) = cursor {
            let Some(record) = self.blocks.get(&h) else {
                break;
            };
            times.push(record.block.header.time);
            if times.len() == 11 {
                break;
            }
            cursor = (record.height > 0).then_some(record.block.header.prev_blockhash);
        }
        times.sort_unstable();
        times.get(times.len() / 2).copied().unwrap_or(0)
    }

    pub fn locate(&self, txid: &Txid) -> Option<TxLocation> {
        if let Some((block, position)) = self.txs.get(txid) {
            let height = self.blocks.get(block).map(|b| b.height)?;
            return Some(TxLocation::Confirmed {
                block: *block,
                height,
                position: *position,
            });
        }
        self.mempool
            .contains_key(txid)
            .then_some(TxLocation::Mempool)
    }

    pub fn transaction(&self, txid: &Txid) -> Option<&Transaction> {
        if let Some((block, position)) = self.txs.get(txid) {
            return self
                .blocks
                .get(block)
                .and_then(|b| b.block.txdata.get(*position));
        }
        self.mempool.get(txid).map(|e| &e.tx)
    }

    /// The output `outpoint` refers to, spent or not, if its transaction is on the best chain or in the mempool.
    pub fn previous_output(&self, outpoint: &OutPoint) -> Option<TxOut> {
        self.transaction(&outpoint.txid)
            .and_then(|tx| tx.output.get(outpoint.vout as usize).cloned())
    }

    fn touch_history(&mut self, script: &Script, txid: Txid) {
        self.history
            .entry(script_hash(script))
            .or_default()
            .insert(txid);
    }

    fn untouch_history(&mut self, script: &Script, txid: &Txid) {
        let key = script_hash(script);
        if let Some(set) = self.history.get_mut(&key) {
            set.remove(txid);
            if set.is_empty() {
                self.history.remove(&key);
            }
        }
    }

    /// Applies a block the kernel connected at `height`. Returns the mempool transactions it evicted as conflicts.
    pub fn connect(&mut self, block: Block, height: u32) -> Vec<Txid> {
        let hash = block.block_hash();
        let mut undo = Vec::new();
        let mut evicted = Vec::new();
        for (position, tx) in block.txdata.iter().enumerate() {
            let txid = tx.compute_txid();
            let coinbase = tx.is_coinbase();
            // A mempool copy of this very transaction becomes confirmed; its history entries stay.
            if let Some(entry) = self.mempool.remove(&txid) {
                for input in &entry.tx.input {
                    self.mempool_spends.remove(&input.previous_output);
                }
            }
            if !coinbase {
                for (vin, input) in tx.input.iter().enumerate() {
                    // A different mempool transaction spending the same coin is now conflicted.
                    if let Some((other, _)) =
                        self.mempool_spends.get(&input.previous_output).copied()
                    {
                        if other != txid {
                            evicted.extend(self.remove_from_mempool(&other));
                        }
                    }
                    if let Some(spent) = self.utxos.remove(&input.previous_output) {
                        self.touch_history(&spent.txout.script_pubkey.clone(), txid);
                        undo.push((input.previous_output, spent));
                    }
                    self.spends
                        .insert(input.previous_output, (txid, vin as u32));
                }
            }
            for (vout, output) in tx.output.iter().enumerate() {
                self.touch_history(&output.script_pubkey, txid);
                // The genesis coinbase is unspendable by consensus, and so are OP_RETURN outputs.
                if height > 0 && !output.script_pubkey.is_op_return() {
                    let utxo = Utxo {
                        txout: output.clone(),
                        height,
                        coinbase,
                    };
                    self.utxos.insert(
                        OutPoint {
                            txid,
                            vout: vout as u32,
                        },
                        utxo,
                    );
                }
            }
            self.txs.insert(txid, (hash, position));
        }
        debug_assert_eq!(self.best.len() as u32, height);
        self.best.truncate(height as usize);
        self.best.push(hash);
        self.blocks.insert(
            hash,
            BlockRecord {
                block,
                height,
                in_best: true,
                undo,
            },
        );
        evicted
    }

    /// Undoes the tip block the kernel disconnected. Returns its non-coinbase transactions, in block order, so
    /// the caller can offer them back to the mempool.
    pub fn disconnect(&mut self, hash: BlockHash) -> Vec<Transaction> {
        let Some(record) = self.blocks.get_mut(&hash) else {
            return Vec::new();
        };
        record.in_best = false;
        let undo = std::mem::take(&mut record.undo);
        let txdata = record.block.txdata.clone();
        for tx in txdata.iter().rev() {
            let txid = tx.compute_txid();
            for (vout, output) in tx.output.iter().enumerate() {
                self.utxos.remove(&OutPoint {
                    txid,
                    vout: vout as u32,
                });
                self.untouch_history(&output.script_pubkey, &txid);
            }
            for input in &tx.input {
                self.spends.remove(&input.previous_output);
            }
            self.txs.remove(&txid);
        }
        for (outpoint, utxo) in undo {
            let spender = txdata
                .iter()
                .find(|tx| tx.input.iter().any(|i| i.previous_output == outpoint))
                .map(|tx| tx.compute_txid());
            if let Some(spender) = spender {
                self.untouch_history(&utxo.txout.script_pubkey, &spender);
            }
            self.utxos.insert(outpoint, utxo);
        }
        if self.best.last() == Some(&hash) {
            self.best.pop();
        }
        txdata.into_iter().filter(|tx| !tx.is_coinbase()).collect()
    }

    /// Removes a mempool transaction and everything that depends on it. Returns the removed txids.
    pub fn remove_from_mempool(&mut self, txid: &Txid) -> Vec<Txid> {
        let Some(entry) = self.mempool.remove(txid) else {
            return Vec::new();
        };
        let mut removed = vec![*txid];
        for (input, spent) in entry.tx.input.iter().zip(&entry.spent) {
            self.mempool_spends.remove(&input.previous_output);
            self.untouch_history(&spent.script_pubkey, txid);
        }
        for (vout, output) in entry.tx.output.iter().enumerate() {
            self.untouch_history(&output.script_pubkey, txid);
            let outpoint = OutPoint {
                txid: *txid,
                vout: vout as u32,
            };
            if let Some((child, _)) = self.mempool_spends.get(&outpoint).copied() {
                removed.extend(self.remove_from_mempool(&child));
            }
        }
        removed
    }

    /// Adds an already validated transaction to the mempool.
    pub fn insert_mempool(&mut self, tx: Transaction, fee: u64, spent: Vec<TxOut>) -> Txid {
        let txid = tx.compute_txid();
        for (vin, (input, prev)) in tx.input.iter().zip(&spent).enumerate() {
            self.mempool_spends
                .insert(input.previous_output, (txid, vin as u32));
            self.touch_history(&prev.script_pubkey, txid);
        }
        for output in &tx.output {
            self.touch_history(&output.script_pubkey, txid);
        }
        self.mempool_seq += 1;
        let vsize = tx.vsize() as u64;
        let entry = MempoolEntry {
            tx,
            fee,
            vsize,
            spent,
            seq: self.mempool_seq,
        };
        self.mempool.insert(txid, entry);
        txid
    }

    /// Mempool transactions ordered for a block: highest feerate first, parents always before children.
    pub fn block_candidates(&self, max_weight: u64) -> Vec<Txid> {
        let mut pending: Vec<&MempoolEntry> = self.mempool.values().collect();
        pending.sort_by(|a, b| b.feerate().total_cmp(&a.feerate()).then(a.seq.cmp(&b.seq)));
        let mut chosen: Vec<Txid> = Vec::new();
        let mut included: HashSet<Txid> = HashSet::new();
        let mut weight = 0u64;
        loop {
            let mut progress = false;
            pending.retain(|entry| {
                let parents_in = entry.tx.input.iter().all(|i| {
                    !self.mempool.contains_key(&i.previous_output.txid)
                        || included.contains(&i.previous_output.txid)
                });
                let tx_weight = entry.tx.weight().to_wu();
                if parents_in && weight + tx_weight <= max_weight {
                    let txid = entry.tx.compute_txid();
                    included.insert(txid);
                    chosen.push(txid);
                    weight += tx_weight;
                    progress = true;
                    false
                } else {
                    true
                }
            });
            if !progress || pending.is_empty() {
                return chosen;
            }
        }
    }
}
