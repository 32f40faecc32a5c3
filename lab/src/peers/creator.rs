//! The creator: the human's wallet in the lab. Pays BOLT11 invoices, keysends, and LNURL-pay / Lightning addresses.

use std::str::FromStr;
use std::time::Instant;

use ldk_node::bitcoin::hashes::Hash;
use ldk_node::bitcoin::secp256k1::PublicKey;
use ldk_node::lightning_invoice::{Bolt11Invoice, Currency};
use serde::Serialize;
use serde_json::Value;

use super::lnurl;
use super::node::{LabNode, Settled};
use super::PeerError;

/// What a settled payment returns to the control API.
#[derive(Debug, Clone, Serialize)]
pub struct PaymentOutcome {
    pub payment_hash: String,
    pub preimage: String,
    pub fee_msat: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub success_action: Option<Value>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

impl From<Settled> for PaymentOutcome {
    fn from(s: Settled) -> Self {
        PaymentOutcome {
            payment_hash: hex::encode(s.payment_hash),
            preimage: hex::encode(s.preimage),
            fee_msat: s.fee_msat,
            success_action: None,
            warnings: Vec::new(),
        }
    }
}

/// Parses and checks a BOLT11 invoice the way a wallet does before paying it.
pub fn parse_invoice(bolt11: &str) -> Result<Bolt11Invoice, PeerError> {
    let s = bolt11.trim();
    let s = s
        .strip_prefix("lightning:")
        .or_else(|| s.strip_prefix("LIGHTNING:"))
        .unwrap_or(s);
    let invoice = Bolt11Invoice::from_str(s)
        .map_err(|e| PeerError::BadRequest(format!("invalid bolt11: {e}")))?;
    if invoice.currency() != Currency::Regtest {
        return Err(PeerError::BadRequest(format!(
            "the invoice is for {:?}, the lab is regtest",
            invoice.currency()
        )));
    }
    if invoice.is_expired() {
        return Err(PeerError::BadRequest("the invoice has expired".into()));
    }
    Ok(invoice)
}

/// Pays a BOLT11 invoice; `amount_msat` is required for (and only allowed with) an invoice without an amount.
pub async fn pay_bolt11(
    creator: &LabNode,
    invoice: Bolt11Invoice,
    amount_msat: Option<u64>,
) -> Result<PaymentOutcome, PeerError> {
    let started = Instant::now();
    let payment_hash = invoice.payment_hash().to_byte_array();
    let id = match (invoice.amount_milli_satoshis(), amount_msat) {
        (Some(_), None) => {
            creator
                .call("bolt11 send", move |n| {
                    n.bolt11_payment().send(&invoice, None)
                })
                .await?
        }
        (Some(invoiced), Some(given)) if invoiced == given => {
            creator
                .call("bolt11 send", move |n| {
                    n.bolt11_payment().send(&invoice, None)
                })
                .await?
        }
        (Some(invoiced), Some(given)) => {
            return Err(PeerError::BadRequest(format!(
                "amount_msat {given} differs from the invoice's {invoiced} msat"
            )))
        }
        (None, Some(given)) if given > 0 => {
            creator
                .call("bolt11 send_using_amount", move |n| {
                    n.bolt11_payment().send_using_amount(&invoice, given, None)
                })
                .await?
        }
        (None, _) => {
            return Err(PeerError::BadRequest(
                "the invoice has no amount: give amount_msat".into(),
            ));
        }
    };
    Ok(creator
        .wait_settled(id, payment_hash, started)
        .await?
        .into())
}

/// Keysend to a node the creator can route to (the hub, or nodes reachable through public channels).
pub async fn keysend(
    creator: &LabNode,
    node_id: &str,
    sats: u64,
) -> Result<PaymentOutcome, PeerError> {
    let started = Instant::now();
    let node_id = PublicKey::from_str(node_id.trim())
        .map_err(|e| PeerError::BadRequest(format!("invalid node_id: {e}")))?;
    if sats == 0 {
        return Err(PeerError::BadRequest("sats must be positive".into()));
    }
    let amount_msat = sats
        .checked_mul(1000)
        .ok_or_else(|| PeerError::BadRequest("sats is too large".into()))?;
    let id = creator
        .call("spontaneous send", move |n| {
            n.spontaneous_payment().send(amount_msat, node_id, None)
        })
        .await?;
    // ldk-node keys a keysend by a random payment id; the hash comes from the stored payment.
    let payment_hash = creator
        .node()
        .payment(&id)
        .and_then(|p| match p.kind {
            ldk_node::payment::PaymentKind::Spontaneous { hash, .. } => Some(hash.0),
            _ => None,
        })
        .unwrap_or([0; 32]);
    Ok(creator
        .wait_settled(id, payment_hash, started)
        .await?
        .into())
}

/// Pays `sats` to an LNURL-pay target after checking the invoice it hands out.
pub async fn pay_lnurl(
    creator: &LabNode,
    http: &reqwest::Client,
    target: &str,
    sats: u64,
    comment: Option<&str>,
) -> Result<PaymentOutcome, PeerError> {
    if sats == 0 {
        return Err(PeerError::BadRequest("sats must be positive".into()));
    }
    let amount_msat = sats
        .checked_mul(1000)
        .ok_or_else(|| PeerError::BadRequest("sats is too large".into()))?;
    let fetched = lnurl::fetch_invoice(http, target, amount_msat, comment).await?;
    let mut outcome = pay_bolt11(creator, fetched.invoice, None).await?;
    outcome.success_action = fetched.success_action;
    outcome.warnings = fetched.warnings;
    Ok(outcome)
}
