//! Receipt signatures: the node key signs `automaton-ln/receipt/v1\n` + the receipt's canonical JSON with
//! Lightning's message signing (lnd `signmessage`, zbase32), so anyone can check a receipt came from this agent.
//! Verification needs only the node id, so `wallet verify-receipt` works while the agent is stopped.

use std::str::FromStr;

use ldk_node::bitcoin::secp256k1::PublicKey;
use ldk_node::lightning::util::message_signing;

use super::{Wallet, WalletError};
use crate::money::receipts::{self, Receipt, ReceiptStatus};

/// What `verify-receipt` found.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Verification {
    pub receipt_id: String,
    pub node_id: String,
    /// The signature is the node key's over this receipt's exact contents.
    pub signature_valid: bool,
    /// For a succeeded Lightning payment: the stored preimage hashes to the payment hash.
    pub proof_of_payment: bool,
    pub problems: Vec<String>,
}

impl Verification {
    pub fn is_valid(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Checks `receipt`'s signature against `node_id` (hex), and its payment proof.
pub fn verify(receipt: &Receipt, node_id: &str) -> Verification {
    let mut problems = Vec::new();
    let signature_valid = match (PublicKey::from_str(node_id.trim()), &receipt.signature) {
        (Err(_), _) => {
            problems.push(format!("`{node_id}` is not a node id"));
            false
        }
        (Ok(_), None) => {
            problems.push("the receipt is not signed".to_string());
            false
        }
        (Ok(key), Some(sig)) => {
            let ok = message_signing::verify(&receipts::signing_bytes(receipt), sig, &key);
            if !ok {
                problems.push(format!(
                    "the signature does not match the receipt's contents and node {node_id}"
                ));
            }
            ok
        }
    };
    let is_lightning = receipt.rail != crate::money::Rail::Onchain;
    let proof_of_payment = receipt.payment_proof().is_some();
    if receipt.status == ReceiptStatus::Succeeded && is_lightning && !proof_of_payment {
        problems.push(
            "the receipt says succeeded but carries no preimage hashing to its payment hash"
                .to_string(),
        );
    }
    Verification {
        receipt_id: receipt.id.clone(),
        node_id: node_id.trim().to_string(),
        signature_valid,
        proof_of_payment,
        problems,
    }
}

/// Checks a Lightning message signature (zbase32, as `Wallet::sign_message` makes) against a node id (hex).
pub fn verify_message(message: &[u8], signature: &str, node_id: &str) -> bool {
    match PublicKey::from_str(node_id.trim()) {
        Ok(key) => message_signing::verify(message, signature, &key),
        Err(_) => false,
    }
}

impl Wallet {
    /// Signs `message` with the node key (Lightning message signing, zbase32): attestations the agent sells.
    pub fn sign_message(&self, message: &[u8]) -> Result<String, WalletError> {
        Ok(self.node()?.sign_message(message))
    }

    /// Signs a receipt in a final state with the node key and stores the signature. Returns the signed receipt.
    pub(super) async fn sign_receipt(&self, receipt: Receipt) -> Result<Receipt, WalletError> {
        if receipt.status == ReceiptStatus::Pending {
            return Ok(receipt);
        }
        let node = match self.node() {
            Ok(node) => node,
            // Unsigned now, signed by the next pass of `sign_unsigned` once the node runs.
            Err(_) => return Ok(receipt),
        };
        let mut signed = receipt;
        signed.signature = None;
        let signature = node.sign_message(&receipts::signing_bytes(&signed));
        receipts::set_signature(&self.inner.db, &signed.id, &signature).await?;
        signed.signature = Some(signature);
        Ok(signed)
    }

    /// Signs every final receipt that has no signature yet (after a restart, or one written while stopped).
    pub(super) async fn sign_unsigned(&self) -> Result<usize, WalletError> {
        let ids: Vec<String> = self
            .inner
            .db
            .call(|c| {
                let mut stmt = c.prepare(
                    "SELECT id FROM receipts WHERE signature IS NULL AND status != 'pending' ORDER BY created_at",
                )?;
                let rows = stmt.query_map([], |r| r.get(0))?;
                rows.collect()
            })
            .await?;
        let mut signed = 0;
        for id in ids {
            if let Some(receipt) = receipts::get(&self.inner.db, &id).await? {
                if self.sign_receipt(receipt).await?.signature.is_some() {
                    signed += 1;
                }
            }
        }
        Ok(signed)
    }
}
