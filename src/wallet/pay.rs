//! The pay functions: each takes a `money::Permit` (nothing leaves the wallet without one), records a pending
//! receipt before anything is sent, blocks until the payment succeeds or fails, and settles or releases the permit.
//! `reconcile` repairs what a crash between any two of those steps left behind, asking the node's own payment
//! store (ldk-node refuses to pay the same invoice twice, so a restarted agent can never pay twice).

use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ldk_node::bitcoin::hashes::{sha256, Hash};
use ldk_node::bitcoin::{Address, Txid};
use ldk_node::lightning::ln::channelmanager::PaymentId;
use ldk_node::lightning::routing::router::RouteParametersConfig;
use ldk_node::lightning_types::payment::PaymentPreimage;
use ldk_node::payment::{PaymentDetails, PaymentDirection, PaymentKind, PaymentStatus};
use ldk_node::NodeError;
use serde::Serialize;

use super::ops::InvoiceSummary;
use super::{Wallet, WalletError};
use crate::money::receipts::{self, Direction, Receipt, ReceiptStatus};
use crate::money::{MoneyError, PaymentOutcome, Permit, Rail};

/// A Lightning payment that went through.
#[derive(Clone, Debug, Serialize)]
pub struct Paid {
    pub payment_hash: String,
    pub amount_msat: u64,
    pub fee_msat: u64,
    pub receipt_id: String,
    /// SHA-256 of the preimage: equal to `payment_hash`, the proof of payment. The preimage itself is not shown.
    pub preimage_sha256: String,
}

/// An on-chain payment that was broadcast.
#[derive(Clone, Debug, Serialize)]
pub struct OnchainSent {
    pub txid: String,
    pub amount_sats: u64,
    pub fee_sats: Option<u64>,
    pub receipt_id: String,
}

impl Wallet {
    /// Pays a BOLT 11 invoice under `permit`, whose amount must be the invoice's (or, for an invoice without an
    /// amount, what is paid) and whose max fee bounds the routing fee.
    pub async fn pay_invoice(
        &self,
        permit: Permit,
        invoice: &InvoiceSummary,
    ) -> Result<Paid, WalletError> {
        let request = permit.request().clone();
        // An L402 purchase is an invoice payment too; its rail keeps the receipt apart.
        if !matches!(request.rail, Rail::Bolt11 | Rail::L402) {
            return self
                .refuse(permit, "this permit is not for an invoice payment")
                .await;
        }
        if let Some(amount) = invoice.amount_msat {
            if amount != request.amount_msat {
                return self
                    .refuse(
                        permit,
                        &format!(
                            "the permit is for {} msat but the invoice asks {amount} msat",
                            request.amount_msat
                        ),
                    )
                    .await;
            }
        }
        if let Err(e) = self.node() {
            self.inner.budget.release(permit).await?;
            return Err(e);
        }
        let hash = invoice.payment_hash.clone();
        self.record_pending(&permit, &hash).await?;

        let route = route_parameters(request.max_fee_msat);
        let bolt11 = invoice.invoice.clone();
        let amountless = invoice.amount_msat.is_none();
        let amount = request.amount_msat;
        tracing::info!(payment_hash = %hash, amount_msat = amount, max_fee_msat = request.max_fee_msat,
            payee = %invoice.payee, "paying invoice");
        let sent = self
            .call_raw("send the payment", move |n| {
                if amountless {
                    n.bolt11_payment()
                        .send_using_amount(&bolt11, amount, Some(route))
                } else {
                    n.bolt11_payment().send(&bolt11, Some(route))
                }
            })
            .await;
        self.finish(permit, &hash, sent).await
    }

    /// Sends a keysend payment of the permit's amount to `node_id`. The preimage is chosen here, so the pending
    /// receipt carries the payment hash before anything is sent.
    pub async fn keysend(&self, permit: Permit, node_id: &str) -> Result<Paid, WalletError> {
        let request = permit.request().clone();
        if request.rail != Rail::Keysend {
            return self
                .refuse(permit, "this permit is not for a keysend payment")
                .await;
        }
        let target = match super::ops::parse_node_id(node_id) {
            Ok(key) => key,
            Err(e) => {
                self.inner.budget.release(permit).await?;
                return Err(e);
            }
        };
        if target.to_string() == self.inner.node_id {
            return self.refuse(permit, "a node cannot pay itself").await;
        }
        if let Err(e) = self.node() {
            self.inner.budget.release(permit).await?;
            return Err(e);
        }
        let preimage = PaymentPreimage(rand::random::<[u8; 32]>());
        let hash = hex::encode(sha256::Hash::hash(&preimage.0).to_byte_array());
        self.record_pending(&permit, &hash).await?;
        let route = route_parameters(request.max_fee_msat);
        let amount = request.amount_msat;
        tracing::info!(payment_hash = %hash, amount_msat = amount, to = %target, "sending keysend");
        let sent = self
            .call_raw("send the keysend payment", move |n| {
                n.spontaneous_payment()
                    .send_with_preimage(amount, target, preimage, Some(route))
            })
            .await;
        self.finish(permit, &hash, sent).await
    }

    /// Sends `permit`'s amount (sats) on-chain to `address`. The receipt's payment hash is the txid.
    pub async fn send_onchain(
        &self,
        permit: Permit,
        address: &str,
    ) -> Result<OnchainSent, WalletError> {
        let request = permit.request().clone();
        if request.rail != Rail::Onchain {
            return self
                .refuse(permit, "this permit is not for an on-chain payment")
                .await;
        }
        let network = match &self.inner.settings {
            Ok(s) => s.network,
            Err(e) => {
                self.inner.budget.release(permit).await?;
                return Err(WalletError::Config(e.clone()));
            }
        };
        let address = match Address::from_str(address.trim())
            .map_err(|e| e.to_string())
            .and_then(|a| a.require_network(network).map_err(|e| e.to_string()))
        {
            Ok(a) => a,
            Err(reason) => {
                self.inner.budget.release(permit).await?;
                return Err(WalletError::BadRequest(format!(
                    "`{}` is not a {network} address: {reason}",
                    address.trim()
                )));
            }
        };
        if !request.amount_msat.is_multiple_of(1000) {
            return self.refuse(permit, "on-chain amounts are whole sats").await;
        }
        let sats = request.amount_msat / 1000;
        tracing::info!(amount_sats = sats, %address, "sending on-chain");
        let sent = self
            .call("send on-chain", move |n| {
                n.onchain_payment().send_to_address(&address, sats, None)
            })
            .await;
        let txid = match sent {
            Ok(txid) => txid,
            Err(e) => {
                // Nothing was broadcast: the transaction could not even be built (funds, fee estimate).
                self.inner.budget.release(permit).await?;
                return Err(e);
            }
        };
        let txid_hex = txid.to_string();
        let receipt = self.record_pending(&permit, &txid_hex).await?;
        // The fee is known once the wallet has seen its own transaction.
        let fee_msat = self.onchain_fee_msat(txid).await;
        let receipt = mark_onchain_sent(&self.inner.db, &receipt.id, fee_msat.unwrap_or(0)).await?;
        self.inner
            .budget
            .settle(permit, request.amount_msat, fee_msat.unwrap_or(0))
            .await?;
        let receipt = self.sign_receipt(receipt).await?;
        self.changed_balance().await;
        Ok(OnchainSent {
            txid: txid_hex,
            amount_sats: sats,
            fee_sats: fee_msat.map(|f| f / 1000),
            receipt_id: receipt.id,
        })
    }

    /// Records the pending receipt (and ties the permit to the payment hash). A payment already made or in
    /// flight gives the permit back and says so: nothing is sent twice.
    async fn record_pending(&self, permit: &Permit, hash: &str) -> Result<Receipt, WalletError> {
        match receipts::record_pending_out(&self.inner.db, permit, hash).await {
            Ok(receipt) => Ok(receipt),
            Err(MoneyError::AlreadyPaid { payment_hash, .. })
            | Err(MoneyError::AlreadyInFlight { payment_hash, .. }) => {
                self.release_by_id(permit.id()).await?;
                Err(WalletError::DuplicatePayment { payment_hash })
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn release_by_id(&self, permit_id: &str) -> Result<(), WalletError> {
        let id = permit_id.to_string();
        self.inner
            .db
            .call(move |c| {
                c.execute(
                    "UPDATE money_permits SET state = 'released', closed_at = ?2 WHERE id = ?1 AND state = 'reserved'",
                    rusqlite::params![id, crate::state::now_rfc3339()],
                )
            })
            .await?;
        Ok(())
    }

    async fn refuse<T>(&self, permit: Permit, why: &str) -> Result<T, WalletError> {
        self.inner.budget.release(permit).await?;
        Err(WalletError::BadRequest(why.to_string()))
    }

    /// After `send`: waits for the end of the payment and closes the books.
    async fn finish(
        &self,
        permit: Permit,
        hash: &str,
        sent: Result<Result<PaymentId, NodeError>, WalletError>,
    ) -> Result<Paid, WalletError> {
        let failure = match sent {
            Ok(Ok(_)) => None,
            // The node already knows this payment (sent before a crash): its own record decides below.
            Ok(Err(NodeError::DuplicatePayment)) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(e) => Some(e.to_string()),
        };
        if let Some(reason) = failure {
            receipts::mark_failed(&self.inner.db, hash, Direction::Out, Some(&reason)).await?;
            self.inner.budget.release(permit).await?;
            if let Some(r) = receipts::get_by_hash(&self.inner.db, hash, Direction::Out).await? {
                let _ = self.sign_receipt(r).await;
            }
            return Err(WalletError::PaymentFailed {
                payment_hash: hash.to_string(),
                reason,
            });
        }
        let timeout = Duration::from_secs(self.inner.config.wallet.payment_timeout_secs);
        let receipt = self.wait_for_outcome(hash, timeout).await?;
        match receipt.status {
            ReceiptStatus::Succeeded => {
                // mark_succeeded already settled the permit in its transaction; this consumes the handle.
                self.inner
                    .budget
                    .settle(permit, receipt.amount_msat, receipt.fee_msat)
                    .await?;
                let receipt = self.sign_receipt(receipt).await?;
                self.changed_balance().await;
                Ok(Paid {
                    payment_hash: receipt.payment_hash.clone(),
                    amount_msat: receipt.amount_msat,
                    fee_msat: receipt.fee_msat,
                    preimage_sha256: receipt.preimage_sha256.clone().unwrap_or_default(),
                    receipt_id: receipt.id,
                })
            }
            ReceiptStatus::Failed => {
                self.inner.budget.release(permit).await?;
                let receipt = self.sign_receipt(receipt).await?;
                Err(WalletError::PaymentFailed {
                    payment_hash: hash.to_string(),
                    reason: receipt
                        .comment
                        .unwrap_or_else(|| "no route, or the recipient rejected it".into()),
                })
            }
            ReceiptStatus::Pending => {
                // Still in flight: the permit stays reserved in the DB and the event pump closes it when the
                // payment ends (marking the receipt settles or releases its permit).
                drop(permit);
                Err(WalletError::PaymentPending {
                    payment_hash: hash.to_string(),
                    secs: timeout.as_secs(),
                })
            }
        }
    }

    /// Waits until the payment's receipt is final. The event pump writes it (with the failure reason); if the
    /// node's own record is final and the pump has not caught up, that record decides.
    async fn wait_for_outcome(
        &self,
        hash: &str,
        timeout: Duration,
    ) -> Result<Receipt, WalletError> {
        let started = Instant::now();
        let mut pause = Duration::from_millis(20);
        let mut node_final_since: Option<Instant> = None;
        loop {
            let receipt = receipts::get_by_hash(&self.inner.db, hash, Direction::Out)
                .await?
                .ok_or_else(|| MoneyError::UnknownReceipt(hash.to_string()))?;
            if receipt.status != ReceiptStatus::Pending {
                return Ok(receipt);
            }
            if let Some(details) = self.payment_details(hash) {
                if details.status != PaymentStatus::Pending {
                    let since = *node_final_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > Duration::from_secs(2) {
                        if let Some(receipt) = self.apply_node_record(hash, &details).await? {
                            return Ok(receipt);
                        }
                    }
                }
            }
            if started.elapsed() >= timeout {
                return Ok(receipt);
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(250));
        }
    }

    /// The node's record of an outgoing Lightning payment (its payment id is the payment hash).
    fn payment_details(&self, hash: &str) -> Option<PaymentDetails> {
        let node = self.node().ok()?;
        let bytes: [u8; 32] = hex::decode(hash).ok()?.try_into().ok()?;
        node.payment(&PaymentId(bytes))
            .filter(|p| p.direction == PaymentDirection::Outbound)
    }

    /// Writes a final node record into the receipt (which settles or releases its permit).
    async fn apply_node_record(
        &self,
        hash: &str,
        details: &PaymentDetails,
    ) -> Result<Option<Receipt>, WalletError> {
        match details.status {
            PaymentStatus::Succeeded => match preimage_of(&details.kind) {
                Some(preimage) => Ok(Some(
                    receipts::mark_succeeded(
                        &self.inner.db,
                        hash,
                        Direction::Out,
                        preimage,
                        details.fee_paid_msat.unwrap_or(0),
                    )
                    .await?,
                )),
                None => {
                    tracing::error!(payment_hash = %hash, "the node reports success without a preimage; not counted as paid");
                    Ok(None)
                }
            },
            PaymentStatus::Failed => Ok(Some(
                receipts::mark_failed(
                    &self.inner.db,
                    hash,
                    Direction::Out,
                    Some("the payment failed (no route, or the recipient rejected it)"),
                )
                .await?,
            )),
            PaymentStatus::Pending => Ok(None),
        }
    }

    async fn onchain_fee_msat(&self, txid: Txid) -> Option<u64> {
        // Syncing puts the new transaction (with its fee) in the node's payment store.
        let _ = self.call("sync the wallet", |n| n.sync_wallets()).await;
        let node = self.node().ok()?;
        node.payment(&PaymentId(txid.to_byte_array()))
            .and_then(|p| p.fee_paid_msat)
    }

    /// Repairs the books after a crash: pending outgoing receipts take the node's word for how their payment
    /// ended (a payment the node never saw failed: nothing left the wallet), on-chain sends broadcast just before
    /// a crash are found again, and then `BudgetPolicy::recover` closes every reservation still open.
    pub(super) async fn reconcile(&self) -> Result<(), WalletError> {
        let pending = receipts::list(
            &self.inner.db,
            receipts::ReceiptFilter {
                limit: None,
                direction: Some(Direction::Out),
                status: Some(ReceiptStatus::Pending),
            },
        )
        .await?;
        for receipt in pending {
            let hash = receipt.payment_hash.clone();
            if receipt.rail == Rail::Onchain {
                let fee = self
                    .onchain_fee_msat(Txid::from_str(&hash).unwrap_or(Txid::all_zeros()))
                    .await;
                let done = mark_onchain_sent(&self.inner.db, &receipt.id, fee.unwrap_or(0)).await?;
                settle_permit_of(&self.inner.db, &done).await?;
                tracing::info!(txid = %hash, "reconciled an on-chain send left pending by the last run");
                continue;
            }
            match self.payment_details(&hash) {
                Some(details) if details.status != PaymentStatus::Pending => {
                    if let Some(done) = self.apply_node_record(&hash, &details).await? {
                        tracing::info!(payment_hash = %hash, status = %done.status.as_str(),
                            "reconciled a payment left pending by the last run");
                    }
                }
                Some(_) => {
                    tracing::info!(payment_hash = %hash, "a payment from the last run is still in flight")
                }
                None => {
                    receipts::mark_failed(
                        &self.inner.db,
                        &hash,
                        Direction::Out,
                        Some("never sent: the agent stopped before the payment left"),
                    )
                    .await?;
                    tracing::info!(payment_hash = %hash, "a payment recorded before a crash was never sent; its reservation is released");
                }
            }
        }
        self.adopt_unrecorded_onchain_sends().await?;
        let wallet = self.clone();
        let summary = self
            .inner
            .budget
            .recover(move |hash| wallet.outcome_of(hash))
            .await?;
        tracing::info!(?summary, "budget reservations reconciled with the node");
        let signed = self.sign_unsigned().await?;
        if signed > 0 {
            tracing::info!(signed, "signed receipts finished while the node was down");
        }
        Ok(())
    }

    /// How the node says a payment ended, for `BudgetPolicy::recover`.
    fn outcome_of(&self, hash: &str) -> PaymentOutcome {
        match self.payment_details(hash) {
            None => PaymentOutcome::Unknown,
            Some(d) => match d.status {
                PaymentStatus::Pending => PaymentOutcome::Pending,
                PaymentStatus::Failed => PaymentOutcome::Failed,
                PaymentStatus::Succeeded if preimage_of(&d.kind).is_some() => {
                    PaymentOutcome::Succeeded {
                        paid_msat: d.amount_msat.unwrap_or(0),
                        fee_msat: d.fee_paid_msat.unwrap_or(0),
                    }
                }
                // Success without proof is not counted as paid, but the reservation stays: money may be gone.
                PaymentStatus::Succeeded => PaymentOutcome::Pending,
            },
        }
    }

    /// An on-chain send whose transaction was broadcast but whose receipt was not yet written when the process
    /// died: its permit has no payment hash. Match it to an outgoing on-chain payment of the same amount made
    /// after the permit, which no receipt claims yet.
    async fn adopt_unrecorded_onchain_sends(&self) -> Result<(), WalletError> {
        let open: Vec<(String, i64, String)> = self
            .inner
            .db
            .call(|c| {
                let mut stmt = c.prepare(
                    "SELECT id, amount_msat, created_at FROM money_permits \
                     WHERE state = 'reserved' AND rail = 'onchain' AND payment_hash IS NULL ORDER BY created_at",
                )?;
                let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
                rows.collect()
            })
            .await?;
        if open.is_empty() {
            return Ok(());
        }
        let _ = self.call("sync the wallet", |n| n.sync_wallets()).await;
        let Ok(node) = self.node() else { return Ok(()) };
        let node = Arc::clone(node);
        for (permit_id, amount_msat, created_at) in open {
            let since = chrono::DateTime::parse_from_rfc3339(&created_at)
                .map(|t| t.timestamp().max(0) as u64)
                .unwrap_or(0);
            let candidates = node.list_payments_with_filter(|p| {
                p.direction == PaymentDirection::Outbound
                    && matches!(p.kind, PaymentKind::Onchain { .. })
                    && p.amount_msat == Some(amount_msat.max(0) as u64)
                    && p.latest_update_timestamp + 5 >= since
            });
            let mut adopted = false;
            for payment in candidates {
                let PaymentKind::Onchain { txid, .. } = payment.kind else {
                    continue;
                };
                let txid_hex = txid.to_string();
                if receipts::get_by_hash(&self.inner.db, &txid_hex, Direction::Out)
                    .await?
                    .is_some()
                {
                    continue;
                }
                adopt_onchain(
                    &self.inner.db,
                    &permit_id,
                    &txid_hex,
                    payment.fee_paid_msat.unwrap_or(0),
                )
                .await?;
                tracing::info!(txid = %txid_hex, permit = %permit_id, "found an on-chain send broadcast just before a crash");
                adopted = true;
                break;
            }
            if !adopted {
                tracing::info!(permit = %permit_id, "an on-chain send was never broadcast; its reservation is released");
            }
        }
        Ok(())
    }

    /// After money moved: refresh the stored balance and tier.
    pub(super) async fn changed_balance(&self) {
        if let Err(error) = self.update_tier().await {
            tracing::warn!(%error, "could not update the survival tier");
        }
        // The channel's capacities settle a moment after the event (the commitment update follows the claim):
        // look again shortly, so the tier does not wait for the next upkeep tick.
        let wallet = self.clone();
        tokio::spawn(async move {
            for delay in [1, 3] {
                tokio::time::sleep(std::time::Duration::from_secs(delay)).await;
                if let Err(error) = wallet.update_tier().await {
                    tracing::debug!(%error, "could not update the survival tier");
                }
            }
        });
    }
}

fn route_parameters(max_fee_msat: u64) -> RouteParametersConfig {
    RouteParametersConfig {
        max_total_routing_fee_msat: Some(max_fee_msat),
        ..RouteParametersConfig::default()
    }
}

/// The preimage of a Lightning payment record.
pub(super) fn preimage_of(kind: &PaymentKind) -> Option<[u8; 32]> {
    match kind {
        PaymentKind::Bolt11 { preimage, .. }
        | PaymentKind::Bolt11Jit { preimage, .. }
        | PaymentKind::Spontaneous { preimage, .. }
        | PaymentKind::Bolt12Offer { preimage, .. }
        | PaymentKind::Bolt12Refund { preimage, .. } => preimage.map(|p| p.0),
        PaymentKind::Onchain { .. } => None,
    }
}

/// Marks an on-chain receipt as sent (broadcast). On-chain payments have no preimage: the txid is the proof, so
/// this is the one receipt transition `money::receipts` has no function for.
async fn mark_onchain_sent(
    db: &crate::state::Db,
    receipt_id: &str,
    fee_msat: u64,
) -> Result<Receipt, WalletError> {
    let id = receipt_id.to_string();
    db.call(move |c| {
        c.execute(
            "UPDATE receipts SET status = 'succeeded', fee_msat = ?2, settled_at = ?3, signature = NULL \
             WHERE id = ?1 AND status = 'pending'",
            rusqlite::params![id, fee_msat as i64, crate::state::now_rfc3339()],
        )
    })
    .await?;
    receipts::get(db, receipt_id)
        .await?
        .ok_or_else(|| MoneyError::UnknownReceipt(receipt_id.to_string()).into())
}

/// Settles the permit of a finished on-chain receipt (amount + fee).
async fn settle_permit_of(db: &crate::state::Db, receipt: &Receipt) -> Result<(), WalletError> {
    let Some(permit) = receipt.permit_id.clone() else {
        return Ok(());
    };
    let (paid, fee) = (receipt.amount_msat as i64, receipt.fee_msat as i64);
    db.call(move |c| {
        c.execute(
            "UPDATE money_permits SET state = 'settled', paid_msat = ?2, fee_msat = ?3, closed_at = ?4 \
             WHERE id = ?1 AND state = 'reserved'",
            rusqlite::params![permit, paid, fee, crate::state::now_rfc3339()],
        )
    })
    .await?;
    Ok(())
}

/// Writes the receipt of an on-chain send found after a crash and settles its permit, in one transaction.
async fn adopt_onchain(
    db: &crate::state::Db,
    permit_id: &str,
    txid: &str,
    fee_msat: u64,
) -> Result<(), WalletError> {
    let (permit_id, txid) = (permit_id.to_string(), txid.to_string());
    db.call(move |c| {
        let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let now = crate::state::now_rfc3339();
        tx.execute(
            "INSERT INTO receipts (id, direction, rail, amount_msat, fee_msat, counterparty, purpose, payment_hash, \
             status, created_at, settled_at, permit_id) \
             SELECT ?1, 'out', 'onchain', amount_msat, ?2, counterparty, purpose, ?3, 'succeeded', created_at, ?4, id \
             FROM money_permits WHERE id = ?5 \
             ON CONFLICT(payment_hash, direction) DO NOTHING",
            rusqlite::params![crate::state::new_id(), fee_msat as i64, txid, now, permit_id],
        )?;
        tx.execute(
            "UPDATE money_permits SET state = 'settled', paid_msat = amount_msat, fee_msat = ?2, payment_hash = ?3, \
             closed_at = ?4 WHERE id = ?1 AND state = 'reserved'",
            rusqlite::params![permit_id, fee_msat as i64, txid, now],
        )?;
        tx.commit()
    })
    .await?;
    Ok(())
}
