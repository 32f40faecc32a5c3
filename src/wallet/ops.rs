//! What the wallet can tell and receive: info, balance, a fresh on-chain address, invoices (ordinary when the
//! channels can take the amount, a JIT channel from the LSP otherwise), channels, and invoice decoding.

use std::str::FromStr;
use std::sync::Arc;

use ldk_node::bitcoin::secp256k1::PublicKey;
use ldk_node::lightning_invoice::{Bolt11Invoice, Bolt11InvoiceDescription, Description};
use ldk_node::LightningBalance;
use serde::Serialize;

use super::{NodeState, Wallet, WalletError};
use crate::money::receipts::{self, IncomingInvoice};
use crate::money::Rail;

/// Longest memo accepted on an invoice (BOLT 11 allows 639 bytes of description).
const MAX_MEMO_BYTES: usize = 639;

/// `wallet info`.
#[derive(Clone, Debug, Serialize)]
pub struct WalletInfo {
    pub node_id: String,
    pub npub: String,
    pub network: String,
    pub esplora_url: Option<String>,
    pub node: NodeState,
    pub best_block_height: Option<u32>,
    pub lsp: Option<LspInfo>,
    pub channels: usize,
    pub usable_channels: usize,
    pub peers: usize,
    pub last_onchain_sync: Option<String>,
    pub last_lightning_sync: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct LspInfo {
    pub node_id: String,
    pub address: String,
    pub connected: bool,
}

/// `wallet balance`. `balance_sats` is what can be spent: Lightning outbound capacity plus spendable on-chain.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Balance {
    pub balance_sats: u64,
    pub lightning_sats: u64,
    pub spendable_lightning_sats: u64,
    pub onchain_sats: u64,
    pub spendable_onchain_sats: u64,
    pub anchor_reserve_sats: u64,
    pub inbound_sats: u64,
    /// Spendable balance in msat (what the budget's reserve floor is checked against).
    pub spendable_msat: u64,
    /// Part of `lightning_sats` in channels that are closing (after a force close: it returns on-chain once the
    /// closing transactions confirm, and cannot be spent before).
    pub closing_sats: u64,
}

/// One channel in `wallet channels`.
#[derive(Clone, Debug, Serialize)]
pub struct ChannelInfo {
    pub channel_id: String,
    pub counterparty_node_id: String,
    pub funding_txid: Option<String>,
    pub capacity_sats: u64,
    pub outbound_msat: u64,
    pub inbound_msat: u64,
    pub confirmations: Option<u32>,
    pub is_outbound: bool,
    pub is_ready: bool,
    pub is_usable: bool,
}

/// A new invoice.
#[derive(Clone, Debug, Serialize)]
pub struct CreatedInvoice {
    pub bolt11: String,
    pub payment_hash: String,
    pub amount_msat: u64,
    /// Paid through a new JIT channel from the LSP (its fee is taken from the payment).
    pub jit_channel: bool,
    pub expires_at: String,
}

/// What an invoice asks for, checked against this wallet's network.
#[derive(Clone, Debug, Serialize)]
pub struct InvoiceSummary {
    pub payment_hash: String,
    pub amount_msat: Option<u64>,
    pub payee: String,
    pub description: Option<String>,
    pub expires_at: String,
    pub expired: bool,
    #[serde(skip)]
    pub(super) invoice: Bolt11Invoice,
}

fn unix_to_rfc3339(secs: u64) -> String {
    chrono::DateTime::from_timestamp(secs as i64, 0)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_default()
}

impl Wallet {
    pub fn info(&self) -> WalletInfo {
        let config = &self.inner.config;
        let node = self
            .inner
            .node
            .get()
            .filter(|_| matches!(*self.inner.state.borrow(), NodeState::Running { .. }));
        let channels = node.map(|n| n.list_channels()).unwrap_or_default();
        let status = node.map(|n| n.status());
        let lsp = config.wallet.lsp.as_ref().map(|lsp| LspInfo {
            node_id: lsp.node_id.clone(),
            address: lsp.address.clone(),
            connected: node.is_some() && self.lsp_connected(),
        });
        WalletInfo {
            node_id: self.inner.node_id.clone(),
            npub: self.npub(),
            network: config.wallet.network.clone(),
            esplora_url: self
                .inner
                .settings
                .as_ref()
                .ok()
                .map(|s| s.esplora_url.clone()),
            node: self.state(),
            best_block_height: status.as_ref().map(|s| s.current_best_block.height),
            lsp,
            usable_channels: channels.iter().filter(|c| c.is_usable).count(),
            channels: channels.len(),
            peers: node.map(|n| n.list_peers().len()).unwrap_or(0),
            last_onchain_sync: status
                .as_ref()
                .and_then(|s| s.latest_onchain_wallet_sync_timestamp)
                .map(unix_to_rfc3339),
            last_lightning_sync: status
                .as_ref()
                .and_then(|s| s.latest_lightning_wallet_sync_timestamp)
                .map(unix_to_rfc3339),
        }
    }

    pub fn balance(&self) -> Result<Balance, WalletError> {
        let node = self.node()?;
        let details = node.list_balances();
        let channels = node.list_channels();
        let spendable_lightning_msat: u64 = channels
            .iter()
            .filter(|c| c.is_usable)
            .map(|c| c.outbound_capacity_msat)
            .sum();
        let inbound_msat: u64 = channels
            .iter()
            .filter(|c| c.is_usable)
            .map(|c| c.inbound_capacity_msat)
            .sum();
        let spendable_msat = spendable_lightning_msat
            .saturating_add(details.spendable_onchain_balance_sats.saturating_mul(1000));
        let open: std::collections::HashSet<_> = channels.iter().map(|c| c.channel_id).collect();
        let closing_sats: u64 = details
            .lightning_balances
            .iter()
            .filter_map(|b| match b {
                LightningBalance::ClaimableOnChannelClose {
                    channel_id,
                    amount_satoshis,
                    ..
                } => (!open.contains(channel_id)).then_some(*amount_satoshis),
                LightningBalance::ClaimableAwaitingConfirmations {
                    amount_satoshis, ..
                }
                | LightningBalance::ContentiousClaimable {
                    amount_satoshis, ..
                }
                | LightningBalance::MaybeTimeoutClaimableHTLC {
                    amount_satoshis, ..
                }
                | LightningBalance::MaybePreimageClaimableHTLC {
                    amount_satoshis, ..
                }
                | LightningBalance::CounterpartyRevokedOutputClaimable {
                    amount_satoshis, ..
                } => Some(*amount_satoshis),
            })
            .sum();
        Ok(Balance {
            balance_sats: spendable_msat / 1000,
            lightning_sats: details.total_lightning_balance_sats,
            spendable_lightning_sats: spendable_lightning_msat / 1000,
            onchain_sats: details.total_onchain_balance_sats,
            spendable_onchain_sats: details.spendable_onchain_balance_sats,
            anchor_reserve_sats: details.total_anchor_channels_reserve_sats,
            inbound_sats: inbound_msat / 1000,
            spendable_msat,
            closing_sats,
        })
    }

    pub async fn new_address(&self) -> Result<String, WalletError> {
        self.call("create an address", |n| {
            n.onchain_payment().new_address().map(|a| a.to_string())
        })
        .await
    }

    pub fn channels(&self) -> Result<Vec<ChannelInfo>, WalletError> {
        let node = self.node()?;
        Ok(node
            .list_channels()
            .into_iter()
            .map(|c| ChannelInfo {
                channel_id: c.channel_id.to_string(),
                counterparty_node_id: c.counterparty_node_id.to_string(),
                funding_txid: c.funding_txo.map(|o| o.txid.to_string()),
                capacity_sats: c.channel_value_sats,
                outbound_msat: c.outbound_capacity_msat,
                inbound_msat: c.inbound_capacity_msat,
                confirmations: c.confirmations,
                is_outbound: c.is_outbound,
                is_ready: c.is_channel_ready,
                is_usable: c.is_usable,
            })
            .collect())
    }

    /// An invoice for `amount_msat`: ordinary when the usable channels can receive it, else through a JIT channel
    /// from the LSP, whose opening fee may be at most `wallet.lsp_max_fee_*` of the configured limits. The invoice is
    /// recorded as a pending incoming receipt, so the payment later shows its purpose.
    pub async fn create_invoice(
        &self,
        amount_msat: u64,
        memo: Option<&str>,
        purpose: Option<&str>,
    ) -> Result<CreatedInvoice, WalletError> {
        self.create_invoice_with_expiry(amount_msat, memo, purpose, None)
            .await
    }

    /// `create_invoice` with its own expiry (default `wallet.invoice_expiry_secs`).
    pub async fn create_invoice_with_expiry(
        &self,
        amount_msat: u64,
        memo: Option<&str>,
        purpose: Option<&str>,
        expiry_secs: Option<u32>,
    ) -> Result<CreatedInvoice, WalletError> {
        if amount_msat == 0 {
            return Err(WalletError::BadRequest(
                "the amount must be at least 1 sat".into(),
            ));
        }
        let memo = memo.unwrap_or("").trim().to_string();
        if memo.len() > MAX_MEMO_BYTES {
            return Err(WalletError::BadRequest(format!(
                "the memo has {} bytes; an invoice holds at most {MAX_MEMO_BYTES}",
                memo.len()
            )));
        }
        let node = Arc::clone(self.node()?);
        let wallet_config = &self.inner.config.wallet;
        let expiry = expiry_secs.unwrap_or(wallet_config.invoice_expiry_secs);
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
        let description = Description::new(memo.clone())
            .map(Bolt11InvoiceDescription::Direct)
            .map_err(|e| WalletError::BadRequest(format!("invalid memo: {e}")))?;
        let invoice = if jit {
            tracing::info!(
                amount_msat,
                inbound_msat,
                fee_limit_msat,
                "no channel can receive this amount: asking the LSP for a JIT channel"
            );
            self.call("create a JIT invoice", move |n| {
                n.bolt11_payment().receive_via_jit_channel(
                    amount_msat,
                    &description,
                    expiry,
                    Some(fee_limit_msat),
                )
            })
            .await?
        } else {
            self.call("create an invoice", move |n| {
                n.bolt11_payment()
                    .receive(amount_msat, &description, expiry)
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
                // The memo says what the invoice is for when no separate purpose is given.
                purpose: purpose
                    .map(str::to_string)
                    .or_else(|| (!memo.is_empty()).then(|| memo.clone())),
                comment: (!memo.is_empty()).then_some(memo),
            },
        )
        .await?;
        let expires_at = invoice
            .expires_at()
            .map(|d| unix_to_rfc3339(d.as_secs()))
            .unwrap_or_default();
        Ok(CreatedInvoice {
            bolt11: invoice.to_string(),
            payment_hash,
            amount_msat,
            jit_channel: jit,
            expires_at,
        })
    }

    /// Parses a BOLT 11 invoice and checks it is for this wallet's network and not expired.
    pub fn decode_invoice(&self, bolt11: &str) -> Result<InvoiceSummary, WalletError> {
        let text = bolt11.trim();
        let text = text
            .strip_prefix("lightning:")
            .or_else(|| text.strip_prefix("LIGHTNING:"))
            .unwrap_or(text);
        let invoice = Bolt11Invoice::from_str(text)
            .map_err(|e| WalletError::BadRequest(format!("not a BOLT 11 invoice: {e}")))?;
        let network = self
            .inner
            .settings
            .as_ref()
            .map(|s| s.network)
            .map_err(|e| WalletError::Config(e.clone()))?;
        if invoice.network() != network {
            return Err(WalletError::BadRequest(format!(
                "the invoice is for {}, this wallet is on {}",
                invoice.network(),
                network
            )));
        }
        let expired = invoice.is_expired();
        if expired {
            return Err(WalletError::BadRequest(format!(
                "the invoice expired at {}",
                invoice
                    .expires_at()
                    .map(|d| unix_to_rfc3339(d.as_secs()))
                    .unwrap_or_default()
            )));
        }
        let description = match invoice.description() {
            ldk_node::lightning_invoice::Bolt11InvoiceDescriptionRef::Direct(d) => {
                Some(d.to_string())
            }
            ldk_node::lightning_invoice::Bolt11InvoiceDescriptionRef::Hash(_) => None,
        };
        Ok(InvoiceSummary {
            payment_hash: invoice.payment_hash().to_string(),
            amount_msat: invoice.amount_milli_satoshis(),
            payee: invoice.get_payee_pub_key().to_string(),
            description,
            expires_at: invoice
                .expires_at()
                .map(|d| unix_to_rfc3339(d.as_secs()))
                .unwrap_or_default(),
            expired,
            invoice,
        })
    }
}

/// The payment hash of a BOLT 11 invoice, whatever its network or expiry (for looking a payment up, not paying).
pub fn payment_hash_of(bolt11: &str) -> Result<String, WalletError> {
    let text = bolt11.trim();
    let text = text
        .strip_prefix("lightning:")
        .or_else(|| text.strip_prefix("LIGHTNING:"))
        .unwrap_or(text);
    let invoice = Bolt11Invoice::from_str(text)
        .map_err(|e| WalletError::BadRequest(format!("not a BOLT 11 invoice: {e}")))?;
    Ok(invoice.payment_hash().to_string())
}

/// When a BOLT 11 invoice expires; `None` when it does not parse.
pub fn invoice_expires_at(bolt11: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    let text = bolt11.trim();
    let text = text
        .strip_prefix("lightning:")
        .or_else(|| text.strip_prefix("LIGHTNING:"))
        .unwrap_or(text);
    let at = Bolt11Invoice::from_str(text).ok()?.expires_at()?;
    chrono::DateTime::from_timestamp(at.as_secs() as i64, 0)
}

/// What a BOLT 11 invoice commits to: its amount (msat) and its description hash (hex), for checking an invoice
/// an LNURL-pay service returned. `None` when it does not parse.
pub fn invoice_commitment(bolt11: &str) -> Option<(Option<u64>, Option<String>)> {
    let invoice = Bolt11Invoice::from_str(bolt11.trim()).ok()?;
    let hash = match invoice.description() {
        ldk_node::lightning_invoice::Bolt11InvoiceDescriptionRef::Hash(h) => Some(h.0.to_string()),
        ldk_node::lightning_invoice::Bolt11InvoiceDescriptionRef::Direct(_) => None,
    };
    Some((invoice.amount_milli_satoshis(), hash))
}

/// Parses a node id for keysend.
pub(super) fn parse_node_id(text: &str) -> Result<PublicKey, WalletError> {
    PublicKey::from_str(text.trim()).map_err(|_| {
        WalletError::BadRequest(format!(
            "`{}` is not a node id (66 hex characters starting with 02 or 03)",
            text.trim()
        ))
    })
}
