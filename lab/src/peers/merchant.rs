//! The merchant: sells lab services. Creates invoices and reports whether they were paid.

use ldk_node::bitcoin::hashes::{sha256, Hash};
use ldk_node::lightning::ln::channelmanager::PaymentId;
use ldk_node::lightning_invoice::{Bolt11InvoiceDescription, Description, Sha256};
use ldk_node::payment::{PaymentDirection, PaymentKind, PaymentStatus};
use serde::Serialize;

use super::node::LabNode;
use super::PeerError;

/// Invoice expiry when the caller does not choose one.
pub const DEFAULT_EXPIRY_SECS: u32 = 3600;

#[derive(Debug, Clone, Serialize)]
pub struct CreatedInvoice {
    pub bolt11: String,
    pub payment_hash: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct InvoiceStatus {
    pub paid: bool,
    /// `pending`, `paid` or `failed` (expired or rejected).
    pub status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub amount_msat: Option<u64>,
    /// Only once paid: the proof a buyer can be asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub preimage: Option<String>,
}

/// What an invoice commits to: a memo shown to the payer, or the SHA-256 of a longer description (LNURL-pay
/// metadata, LUD-06).
#[derive(Debug, Clone)]
pub enum InvoiceDescription {
    Memo(String),
    Hash([u8; 32]),
}

pub async fn create_invoice(
    merchant: &LabNode,
    msat: u64,
    description: InvoiceDescription,
    expiry_secs: Option<u32>,
) -> Result<CreatedInvoice, PeerError> {
    if msat == 0 {
        return Err(PeerError::BadRequest("msat must be positive".into()));
    }
    let expiry = expiry_secs.unwrap_or(DEFAULT_EXPIRY_SECS);
    if expiry == 0 {
        return Err(PeerError::BadRequest("expiry_secs must be positive".into()));
    }
    let description = match description {
        InvoiceDescription::Memo(memo) => {
            Bolt11InvoiceDescription::Direct(Description::new(memo).map_err(|e| {
                PeerError::BadRequest(format!("memo is not a valid invoice description: {e}"))
            })?)
        }
        InvoiceDescription::Hash(hash) => {
            Bolt11InvoiceDescription::Hash(Sha256(sha256::Hash::from_byte_array(hash)))
        }
    };
    let invoice = merchant
        .call("bolt11 receive", move |n| {
            n.bolt11_payment().receive(msat, &description, expiry)
        })
        .await?;
    Ok(CreatedInvoice {
        bolt11: invoice.to_string(),
        payment_hash: invoice.payment_hash().to_string(),
    })
}

pub fn invoice_status(merchant: &LabNode, payment_hash: &str) -> Result<InvoiceStatus, PeerError> {
    let bytes: [u8; 32] = hex::decode(payment_hash.trim())
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| PeerError::BadRequest("payment_hash must be 64 hex characters".into()))?;
    // ldk-node keys an inbound BOLT11 payment by its payment hash.
    let details = merchant
        .node()
        .payment(&PaymentId(bytes))
        .filter(|p| p.direction == PaymentDirection::Inbound)
        .ok_or_else(|| {
            PeerError::NotFound(format!(
                "no merchant invoice with payment hash {payment_hash}"
            ))
        })?;
    let paid = details.status == PaymentStatus::Succeeded;
    let preimage = match details.kind {
        PaymentKind::Bolt11 { preimage, .. } | PaymentKind::Bolt11Jit { preimage, .. } if paid => {
            preimage
        }
        _ => None,
    };
    Ok(InvoiceStatus {
        paid,
        status: match details.status {
            PaymentStatus::Succeeded => "paid",
            PaymentStatus::Pending => "pending",
            PaymentStatus::Failed => "failed",
        },
        amount_msat: details.amount_msat,
        preimage: preimage.map(|p| hex::encode(p.0)),
    })
}
