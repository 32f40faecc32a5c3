//! What the HTTP face needs from the wallet: invoices whose description is a hash (LNURL-pay, LUD-06), the node's
//! own record of an incoming payment (LUD-21 verify), and re-signing a receipt after the L402 buyer linked it to
//! its request and response.

use std::sync::Arc;

use ldk_node::bitcoin::hashes::{sha256, Hash};
use ldk_node::lightning::ln::channelmanager::PaymentId;
use ldk_node::lightning_invoice::{Bolt11InvoiceDescription, Sha256};
use ldk_node::payment::{PaymentDirection, PaymentStatus};

use super::ops::CreatedInvoice;
use super::pay::preimage_of;
use super::{Wallet, WalletError};
use crate::money::receipts::{self, IncomingInvoice};
use crate::money::Rail;

/// The node's record of a payment to one of this wallet's invoices.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InboundPayment {
    pub settled: bool,
    pub failed: bool,
    pub amount_msat: Option<u64>,
    /// Known once settled (ldk-node claims the payment itself).
    pub preimage: Option<[u8; 32]>,
}

impl Wallet {
    /// An invoice for exactly `amount_msat` whose description is `description_hash` (LUD-06: SHA-256 of the
    /// metadata string as served). Through a JIT channel from the LSP when no channel can receive it, like
    /// `create_invoice`. Recorded as a pending incoming receipt carrying `purpose` and the payer's `comment`.
    pub async fn create_invoice_with_description_hash(
        &self,
        amount_msat: u64,
        description_hash: [u8; 32],
        expiry_secs: u32,
        purpose: Option<&str>,
        comment: Option<&str>,
    ) -> Result<CreatedInvoice, WalletError> {
        if amount_msat == 0 {
            return Err(WalletError::BadRequest(
                "the amount must be at least 1 msat".into(),
            ));
        }
        let node = Arc::clone(self.node()?);
        let wallet_config = &self.inner.config.wallet;
        let inbound_msat: u64 = node
            .list_channels()
            .iter()
            .filter(|c| c.is_usable)
            .map(|c| c.inbound_capacity_msat)
            .max()
            .unwrap_or(0);
        let has_lsp = self
            .inner
            .settings
            .as_ref()
            .map(|s| s.lsp.is_some())
            .unwrap_or(false);
        let jit = inbound_msat < amount_msat;
        if jit && !has_lsp {
            return Err(WalletError::NoLiquidity(format!(
                "the channels can receive at most {} sats in one payment and no LSP is configured (wallet.lsp)",
                inbound_msat / 1000
            )));
        }
        let fee_limit_msat = wallet_config
            .lsp_max_fee_min_sats
            .saturating_mul(1000)
            .max(amount_msat.saturating_mul(wallet_config.lsp_max_fee_ppm) / 1_000_000);
        let description =
            Bolt11InvoiceDescription::Hash(Sha256(sha256::Hash::from_byte_array(description_hash)));
        let invoice = if jit {
            self.call("create a JIT invoice", move |n| {
                n.bolt11_payment().receive_via_jit_channel(
                    amount_msat,
                    &description,
                    expiry_secs,
                    Some(fee_limit_msat),
                )
            })
            .await?
        } else {
            self.call("create an invoice", move |n| {
                n.bolt11_payment()
                    .receive(amount_msat, &description, expiry_secs)
            })
            .await?
        };
        let payment_hash = invoice.payment_hash().to_string();
        receipts::record_pending_in(
            &self.inner.db,
            IncomingInvoice {
                payment_hash: payment_hash.clone(),
                amount_msat: Some(amount_msat),
                rail: Some(Rail::Bolt11),
                purpose: purpose.map(str::to_string),
                comment: comment.map(str::to_string),
            },
        )
        .await?;
        let expires_at = invoice
            .expires_at()
            .and_then(|d| chrono::DateTime::from_timestamp(d.as_secs() as i64, 0))
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
            .unwrap_or_default();
        Ok(CreatedInvoice {
            bolt11: invoice.to_string(),
            payment_hash,
            amount_msat,
            jit_channel: jit,
            expires_at,
        })
    }

    /// The node's own record of a payment to this wallet for `payment_hash` (hex), while the node runs. Unlike the
    /// receipts table (filled by the event pump a moment later), this is final the instant the node claimed it.
    pub fn inbound_payment(&self, payment_hash: &str) -> Option<InboundPayment> {
        let node = self.node().ok()?;
        let bytes: [u8; 32] = hex::decode(payment_hash.trim()).ok()?.try_into().ok()?;
        let details = node
            .payment(&PaymentId(bytes))
            .filter(|p| p.direction == PaymentDirection::Inbound)?;
        let preimage =
            preimage_of(&details.kind).filter(|p| sha256::Hash::hash(p).to_byte_array() == bytes);
        Some(InboundPayment {
            settled: details.status == PaymentStatus::Succeeded,
            failed: details.status == PaymentStatus::Failed,
            amount_msat: details.amount_msat,
            preimage,
        })
    }

    /// Signs receipt `id` again (after its request/response hashes or meta changed, which clears the signature).
    pub async fn resign_receipt(&self, id: &str) -> Result<(), WalletError> {
        if let Some(receipt) = receipts::get(&self.inner.db, id).await? {
            self.sign_receipt(receipt).await?;
        }
        Ok(())
    }
}
