//! The event pump: reads ldk-node's events one by one, writes what they mean into the receipts (idempotently:
//! every event may arrive twice and the process may die between any two lines), and only then acknowledges them.
//! A payment counts as succeeded only when `sha256(preimage) == payment_hash` was checked (`money::receipts`).

use std::sync::Arc;
use std::time::Duration;

use ldk_node::lightning::ln::channelmanager::PaymentId;
use ldk_node::payment::PaymentKind;
use ldk_node::{Event, Node};
use tokio_util::sync::CancellationToken;

use super::pay::preimage_of;
use super::{Wallet, WalletError};
use crate::money::receipts::{self, Direction, IncomingPayment, ReceiptStatus};
use crate::money::{MoneyError, Rail};

/// The TLV type wallets use for a keysend message (a payer's note).
const KEYSEND_MESSAGE_TLV: u64 = 34_349_334;
/// Longest payer's note kept on a receipt.
const MAX_NOTE_CHARS: usize = 280;

/// Runs until `cancel`. An event whose effect cannot be persisted is not acknowledged: it is retried, so a
/// payment is never acknowledged without its receipt.
pub(super) async fn pump(wallet: Wallet, cancel: CancellationToken) {
    let Some(node) = wallet.inner.node.get().cloned() else {
        return;
    };
    let mut retry = Duration::from_millis(200);
    loop {
        let event = tokio::select! {
            _ = cancel.cancelled() => return,
            event = node.next_event_async() => event,
        };
        match handle(&wallet, &node, &event).await {
            Ok(()) => {
                retry = Duration::from_millis(200);
                let acking = Arc::clone(&node);
                match tokio::task::spawn_blocking(move || acking.event_handled()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => {
                        tracing::warn!(%error, "could not acknowledge a node event; it will come again")
                    }
                    Err(error) => tracing::warn!(%error, "acknowledging a node event panicked"),
                }
            }
            Err(error) => {
                tracing::error!(%error, event = %describe(&event), retry_in_ms = retry.as_millis() as u64,
                    "could not record a node event; retrying before acknowledging it");
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(retry) => {}
                }
                retry = (retry * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// How long a received payment's wake waits for the money to become spendable.
const SPENDABLE_BEFORE_WAKE: std::time::Duration = std::time::Duration::from_secs(5);

async fn handle(wallet: &Wallet, node: &Node, event: &Event) -> Result<(), WalletError> {
    tracing::info!(event = %describe(event), "node event");
    let db = &wallet.inner.db;
    match event {
        Event::PaymentSuccessful {
            payment_id,
            payment_hash,
            payment_preimage,
            fee_paid_msat,
        } => {
            let hash = hex::encode(payment_hash.0);
            let preimage = payment_preimage.map(|p| p.0).or_else(|| {
                node.payment(&payment_id.unwrap_or(PaymentId(payment_hash.0)))
                    .and_then(|p| preimage_of(&p.kind))
            });
            let Some(preimage) = preimage else {
                tracing::error!(payment_hash = %hash, "payment reported successful without a preimage: not counted as paid");
                return Ok(());
            };
            match receipts::mark_succeeded(
                db,
                &hash,
                Direction::Out,
                preimage,
                fee_paid_msat.unwrap_or(0),
            )
            .await
            {
                Ok(receipt) => {
                    count_late_success(db, &receipt).await?;
                    wallet.sign_receipt(receipt).await?;
                }
                Err(MoneyError::UnknownReceipt(_)) => {
                    tracing::error!(payment_hash = %hash, "an outgoing payment succeeded that has no receipt (it did not pass the budget gate)");
                }
                Err(e) => return Err(e.into()),
            }
            wallet.changed_balance().await;
        }
        Event::PaymentFailed {
            payment_hash: Some(payment_hash),
            reason,
            ..
        } => {
            let hash = hex::encode(payment_hash.0);
            let reason = reason
                .map(|r| format!("{r:?}"))
                .unwrap_or_else(|| "unknown reason".into());
            match receipts::mark_failed(db, &hash, Direction::Out, Some(&reason)).await {
                Ok(receipt) if receipt.status == ReceiptStatus::Failed => {
                    wallet.sign_receipt(receipt).await?;
                }
                Ok(_) | Err(MoneyError::UnknownReceipt(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Event::PaymentReceived {
            payment_id,
            payment_hash,
            amount_msat,
            custom_records,
        } => {
            let hash = hex::encode(payment_hash.0);
            let details = node.payment(&payment_id.unwrap_or(PaymentId(payment_hash.0)));
            let preimage = details.as_ref().and_then(|d| preimage_of(&d.kind));
            let (rail, lsp_fee_msat) = match details.as_ref().map(|d| &d.kind) {
                Some(PaymentKind::Spontaneous { .. }) => (Rail::Keysend, None),
                Some(PaymentKind::Bolt11Jit {
                    counterparty_skimmed_fee_msat,
                    ..
                }) => (Rail::Bolt11, *counterparty_skimmed_fee_msat),
                _ => (Rail::Bolt11, None),
            };
            if preimage.is_none() {
                // ldk-node claims received payments itself, so it always knows the preimage; if it did not, the
                // receipt is recorded without proof rather than lost.
                tracing::warn!(payment_hash = %hash, "received a payment whose preimage the node does not report");
            }
            let note = custom_records
                .iter()
                .find(|r| r.type_num == KEYSEND_MESSAGE_TLV)
                .and_then(|r| String::from_utf8(r.value.clone()).ok())
                .map(|s| s.chars().take(MAX_NOTE_CHARS).collect::<String>());
            let already = receipts::get_by_hash(db, &hash, Direction::In)
                .await?
                .is_some_and(|r| r.status == ReceiptStatus::Succeeded);
            let meta = lsp_fee_msat.map(|fee| serde_json::json!({ "lsp_fee_msat": fee }));
            let receipt = receipts::record_incoming(
                db,
                IncomingPayment {
                    payment_hash: hash.clone(),
                    amount_msat: *amount_msat,
                    preimage,
                    rail,
                    counterparty: None,
                    purpose: None,
                    comment: note,
                    meta,
                },
            )
            .await?;
            wallet.sign_receipt(receipt).await?;
            wallet.changed_balance().await;
            if !already {
                // The agent is woken once the money can be spent: a JIT channel opened for this payment is usable a
                // moment after it, and an agent woken before would still see its old survival tier.
                let reason = format!(
                    "You received {} sats (payment hash {hash}). Your balance changed; see check_balance.",
                    amount_msat / 1000
                );
                let wallet = wallet.clone();
                tokio::spawn(async move {
                    wallet.wait_spendable(SPENDABLE_BEFORE_WAKE).await;
                    if let Err(error) = wallet.update_tier().await {
                        tracing::debug!(%error, "could not update the survival tier");
                    }
                    if let Err(error) = wake_agent(&wallet, reason).await {
                        tracing::warn!(%error, "could not wake the agent for a received payment");
                    }
                });
            }
        }
        Event::ChannelReady { .. } => {
            wallet.changed_balance().await;
        }
        Event::ChannelClosed {
            channel_id,
            counterparty_node_id,
            reason,
            ..
        } => {
            let reason = reason
                .as_ref()
                .map(|r| r.to_string())
                .unwrap_or_else(|| "no reason given".into());
            let peer = counterparty_node_id
                .as_ref()
                .map(|p| p.to_string())
                .unwrap_or_else(|| "an unknown peer".into());
            tracing::warn!(channel = %channel_id, %peer, %reason, "a channel closed");
            wallet.changed_balance().await;
            wake_agent(
                wallet,
                format!(
                    "Your Lightning channel {channel_id} with {peer} closed ({reason}). Money it held returns                      on-chain once the closing transactions confirm; until then it cannot be spent. See                      check_balance."
                ),
            )
            .await?;
        }
        Event::PaymentFailed {
            payment_hash: None, ..
        }
        | Event::PaymentClaimable { .. }
        | Event::PaymentForwarded { .. }
        | Event::ChannelPending { .. }
        | Event::SplicePending { .. }
        | Event::SpliceFailed { .. } => {}
    }
    Ok(())
}

/// A payment given up for lost (its reservation released: a crash hid it from the node's payment store) that
/// succeeded after all: the money left, so the budget counts it.
async fn count_late_success(
    db: &crate::state::Db,
    receipt: &crate::money::Receipt,
) -> Result<(), WalletError> {
    let Some(permit) = receipt.permit_id.clone() else {
        return Ok(());
    };
    let (paid, fee) = (receipt.amount_msat as i64, receipt.fee_msat as i64);
    let changed = db
        .call(move |c| {
            c.execute(
                "UPDATE money_permits SET state = 'settled', paid_msat = ?2, fee_msat = ?3, closed_at = ?4 \
                 WHERE id = ?1 AND state = 'released'",
                rusqlite::params![permit, paid, fee, crate::state::now_rfc3339()],
            )
        })
        .await?;
    if changed > 0 {
        tracing::warn!(payment_hash = %receipt.payment_hash, "a payment given up for lost succeeded; the budget now counts it");
    }
    Ok(())
}

/// Tells the agent loop something happened to its money (a wake event with the agent's own authority; it
/// never carries text chosen by the payer).
async fn wake_agent(wallet: &Wallet, reason: String) -> Result<(), WalletError> {
    wallet
        .inner
        .db
        .call(move |c| {
            c.execute(
                "INSERT INTO wake_events (source, reason, created_at) VALUES ('wallet', ?1, ?2)",
                rusqlite::params![reason, crate::state::now_rfc3339()],
            )
        })
        .await?;
    Ok(())
}

/// A one-line description of an event that never includes a preimage.
fn describe(event: &Event) -> String {
    match event {
        Event::PaymentSuccessful {
            payment_hash,
            fee_paid_msat,
            ..
        } => format!(
            "payment_successful hash={payment_hash} fee_msat={}",
            fee_paid_msat.unwrap_or(0)
        ),
        Event::PaymentFailed {
            payment_hash,
            reason,
            ..
        } => format!(
            "payment_failed hash={} reason={reason:?}",
            payment_hash.map(|h| h.to_string()).unwrap_or_default()
        ),
        Event::PaymentReceived {
            payment_hash,
            amount_msat,
            ..
        } => format!("payment_received hash={payment_hash} amount_msat={amount_msat}"),
        Event::PaymentClaimable {
            payment_hash,
            claimable_amount_msat,
            ..
        } => format!("payment_claimable hash={payment_hash} amount_msat={claimable_amount_msat}"),
        Event::PaymentForwarded {
            outbound_amount_forwarded_msat,
            ..
        } => format!(
            "payment_forwarded amount_msat={}",
            outbound_amount_forwarded_msat.unwrap_or(0)
        ),
        Event::ChannelPending {
            channel_id,
            counterparty_node_id,
            funding_txo,
            ..
        } => format!(
            "channel_pending id={channel_id} peer={counterparty_node_id} funding={funding_txo}"
        ),
        Event::ChannelReady {
            channel_id,
            counterparty_node_id,
            ..
        } => format!(
            "channel_ready id={channel_id} peer={}",
            counterparty_node_id
                .map(|p| p.to_string())
                .unwrap_or_default()
        ),
        Event::ChannelClosed {
            channel_id,
            counterparty_node_id,
            reason,
            ..
        } => format!(
            "channel_closed id={channel_id} peer={} reason={}",
            counterparty_node_id
                .map(|p| p.to_string())
                .unwrap_or_default(),
            reason.as_ref().map(|r| r.to_string()).unwrap_or_default()
        ),
        Event::SplicePending { channel_id, .. } => format!("splice_pending id={channel_id}"),
        Event::SpliceFailed { channel_id, .. } => format!("splice_failed id={channel_id}"),
    }
}
