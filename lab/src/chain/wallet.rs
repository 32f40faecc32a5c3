//! The lab's own coins: a single P2WPKH key that receives coinbase rewards and pays the faucet.

use std::path::Path;
use std::str::FromStr;

use bitcoin::secp256k1::{All, Message, Secp256k1, SecretKey};
use bitcoin::sighash::{EcdsaSighashType, SighashCache};
use bitcoin::{
    absolute, transaction, Address, Amount, CompressedPublicKey, Network, OutPoint, ScriptBuf,
    Sequence, Transaction, TxIn, TxOut, Witness,
};

use super::mempool::COINBASE_MATURITY;
use super::state::ChainState;

/// Feerate of faucet payments, in sat/vB.
const FAUCET_FEERATE: u64 = 2;
/// Change below this is left to the miner rather than creating dust.
const MIN_CHANGE: u64 = 1_000;

pub struct LabWallet {
    secp: Secp256k1<All>,
    secret: SecretKey,
    public: CompressedPublicKey,
    pub script: ScriptBuf,
    pub address: Address,
}

impl LabWallet {
    /// Loads the lab key from `path`, creating it (mode 0600) on first use.
    pub fn load_or_create(path: &Path) -> anyhow::Result<LabWallet> {
        let secret = match std::fs::read_to_string(path) {
            Ok(hex) => SecretKey::from_str(hex.trim())?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let secret = SecretKey::new(&mut bitcoin::secp256k1::rand::thread_rng());
                write_private(path, &secret.display_secret().to_string())?;
                secret
            }
            Err(e) => return Err(e.into()),
        };
        let secp = Secp256k1::new();
        let public = CompressedPublicKey(secret.public_key(&secp));
        let address = Address::p2wpkh(&public, Network::Regtest);
        Ok(LabWallet {
            secp,
            secret,
            public,
            script: address.script_pubkey(),
            address,
        })
    }

    /// Coins the lab can spend now: mature, not already spent in the mempool; unconfirmed change included.
    fn spendable(&self, state: &ChainState) -> Vec<(OutPoint, TxOut)> {
        let next_height = state.tip_height() + 1;
        let mut coins: Vec<(OutPoint, TxOut)> = state
            .utxos
            .iter()
            .filter(|(op, u)| {
                u.txout.script_pubkey == self.script
                    && (!u.coinbase || next_height - u.height >= COINBASE_MATURITY)
                    && !state.mempool_spends.contains_key(op)
            })
            .map(|(op, u)| (*op, u.txout.clone()))
            .collect();
        for (txid, entry) in &state.mempool {
            for (vout, out) in entry.tx.output.iter().enumerate() {
                let op = OutPoint {
                    txid: *txid,
                    vout: vout as u32,
                };
                if out.script_pubkey == self.script && !state.mempool_spends.contains_key(&op) {
                    coins.push((op, out.clone()));
                }
            }
        }
        // Confirmed and largest first keeps faucet chains short.
        coins.sort_by(|a, b| b.1.value.cmp(&a.1.value).then(a.0.cmp(&b.0)));
        coins
    }

    /// Spendable balance in sats.
    pub fn balance(&self, state: &ChainState) -> u64 {
        self.spendable(state)
            .iter()
            .map(|(_, o)| o.value.to_sat())
            .sum()
    }

    /// Builds and signs a transaction paying `outputs` from the lab's coins.
    pub fn pay(
        &self,
        state: &ChainState,
        outputs: &[(ScriptBuf, u64)],
    ) -> Result<Transaction, String> {
        if outputs.is_empty() {
            return Err("no outputs to pay".into());
        }
        let target: u64 = outputs.iter().map(|(_, v)| *v).sum();
        let mut tx_outs: Vec<TxOut> = outputs
            .iter()
            .map(|(script, value)| TxOut {
                value: Amount::from_sat(*value),
                script_pubkey: script.clone(),
            })
            .collect();
        let outputs_vbytes: u64 = tx_outs
            .iter()
            .map(|o| 9 + o.script_pubkey.len() as u64)
            .sum();
        let mut selected = Vec::new();
        let mut total = 0u64;
        let mut fee = 0u64;
        for coin in self.spendable(state) {
            total += coin.1.value.to_sat();
            selected.push(coin);
            // 11 vB overhead, 68 vB per P2WPKH input, our own change output of 31 vB.
            fee = FAUCET_FEERATE * (11 + 68 * selected.len() as u64 + outputs_vbytes + 31);
            if total >= target + fee {
                break;
            }
        }
        if total < target + fee {
            return Err(format!(
                "the lab's wallet has {total} sats spendable, needs {}",
                target + fee
            ));
        }
        let change = total - target - fee;
        if change >= MIN_CHANGE {
            tx_outs.push(TxOut {
                value: Amount::from_sat(change),
                script_pubkey: self.script.clone(),
            });
        }
        let mut tx = Transaction {
            version: transaction::Version::TWO,
            lock_time: absolute::LockTime::ZERO,
            input: selected
                .iter()
                .map(|(op, _)| TxIn {
                    previous_output: *op,
                    script_sig: ScriptBuf::new(),
                    sequence: Sequence::ENABLE_RBF_NO_LOCKTIME,
                    witness: Witness::new(),
                })
                .collect(),
            output: tx_outs,
        };
        let mut witnesses = Vec::with_capacity(selected.len());
        {
            let mut cache = SighashCache::new(&tx);
            for (index, (_, prev)) in selected.iter().enumerate() {
                let sighash = cache
                    .p2wpkh_signature_hash(index, &self.script, prev.value, EcdsaSighashType::All)
                    .map_err(|e| e.to_string())?;
                let signature = self.secp.sign_ecdsa(&Message::from(sighash), &self.secret);
                let signature = bitcoin::ecdsa::Signature {
                    signature,
                    sighash_type: EcdsaSighashType::All,
                };
                witnesses.push(Witness::p2wpkh(&signature, &self.public.0));
            }
        }
        for (input, witness) in tx.input.iter_mut().zip(witnesses) {
            input.witness = witness;
        }
        Ok(tx)
    }
}

/// Writes a secret file readable only by its owner.
pub fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(contents.as_bytes())?;
    file.sync_all()
}
