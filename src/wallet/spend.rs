//! Spending through the gate: every payment the CLI or the agent makes is described as a `SpendRequest`,
//! authorized by `BudgetPolicy` (which reserves it), paid with the permit, and settled or released. This is the
//! only caller of the wallet's pay functions, so no sat leaves without a permit.

use std::time::Duration;

use serde::Serialize;

use super::{OnchainSent, Paid, Wallet, WalletError};
use crate::money::approvals::{self, ApprovalStatus};
use crate::money::{BudgetError, Permit, Rail, SpendRequest};

/// How long a gated payment may wait for the creator's approval (`None`: refuse at once with
/// `NeedsApproval`, the agent asks again later).
#[derive(Clone, Copy, Debug, Default)]
pub struct ApprovalWait(pub Option<Duration>);

/// What a payment request said, for tools and the control socket.
#[derive(Clone, Debug, Serialize)]
#[serde(untagged)]
pub enum SpendOutcome {
    Lightning(Paid),
    Onchain(OnchainSent),
}

/// The default routing-fee limit for `amount_msat`: `wallet.max_fee_ppm` of it, at least `max_fee_min_sats`.
pub fn default_max_fee_msat(wallet: &Wallet, amount_msat: u64) -> u64 {
    let c = &wallet.config().wallet;
    (amount_msat.saturating_mul(c.max_fee_ppm) / 1_000_000)
        .max(c.max_fee_min_sats.saturating_mul(1000))
}

/// Pays a BOLT 11 invoice. `amount_msat` is required for an invoice without an amount and must otherwise match.
pub async fn pay_invoice(
    wallet: &Wallet,
    bolt11: &str,
    amount_msat: Option<u64>,
    max_fee_msat: Option<u64>,
    purpose: &str,
    wait: ApprovalWait,
) -> Result<Paid, WalletError> {
    let invoice = wallet.decode_invoice(bolt11)?;
    let amount = match (invoice.amount_msat, amount_msat) {
        (Some(a), Some(b)) if a != b => {
            return Err(WalletError::BadRequest(format!(
                "the invoice is for {a} msat, not {b} msat"
            )))
        }
        (Some(a), _) => a,
        (None, Some(b)) if b > 0 => b,
        (None, _) => {
            return Err(WalletError::BadRequest(
                "the invoice has no amount: say how much to pay".into(),
            ))
        }
    };
    let request = SpendRequest {
        amount_msat: amount,
        max_fee_msat: max_fee_msat.unwrap_or_else(|| default_max_fee_msat(wallet, amount)),
        rail: Rail::Bolt11,
        purpose: purpose_or(purpose, invoice.description.as_deref(), "invoice payment"),
        counterparty: Some(invoice.payee.clone()),
    };
    let permit = authorize(wallet, request, wait).await?;
    wallet.pay_invoice(permit, &invoice).await
}

/// Sends a keysend payment of `amount_msat` to `node_id`.
pub async fn keysend(
    wallet: &Wallet,
    node_id: &str,
    amount_msat: u64,
    max_fee_msat: Option<u64>,
    purpose: &str,
    wait: ApprovalWait,
) -> Result<Paid, WalletError> {
    let target = super::ops::parse_node_id(node_id)?;
    let request = SpendRequest {
        amount_msat,
        max_fee_msat: max_fee_msat.unwrap_or_else(|| default_max_fee_msat(wallet, amount_msat)),
        rail: Rail::Keysend,
        purpose: purpose_or(purpose, None, "keysend payment"),
        counterparty: Some(target.to_string()),
    };
    let permit = authorize(wallet, request, wait).await?;
    wallet.keysend(permit, &target.to_string()).await
}

/// Sends `sats` on-chain to `address`.
pub async fn send_onchain(
    wallet: &Wallet,
    address: &str,
    sats: u64,
    max_fee_sats: Option<u64>,
    purpose: &str,
    wait: ApprovalWait,
) -> Result<OnchainSent, WalletError> {
    let request = SpendRequest {
        amount_msat: sats.saturating_mul(1000),
        max_fee_msat: max_fee_sats
            .unwrap_or(wallet.config().wallet.onchain_max_fee_sats)
            .saturating_mul(1000),
        rail: Rail::Onchain,
        purpose: purpose_or(purpose, None, "on-chain payment"),
        counterparty: Some(address.trim().to_string()),
    };
    let permit = authorize(wallet, request, wait).await?;
    wallet.send_onchain(permit, address).await
}

/// How long a payment waits for channels that hold money to become usable again (after a start).
const SPENDABLE_WAIT: std::time::Duration = std::time::Duration::from_secs(15);

/// Asks the gate, against the spendable balance; above the approval threshold, waits for the creator when
/// `wait` allows, then asks again (an approved request passes exactly once).
pub async fn authorize(
    wallet: &Wallet,
    request: SpendRequest,
    wait: ApprovalWait,
) -> Result<Permit, WalletError> {
    // The node must run before anything is reserved: a payment that cannot be sent should not hold budget.
    wallet.node()?;
    // Just after a start, channels re-establish with their peers for a moment; their money counts once they do.
    wallet.wait_spendable(SPENDABLE_WAIT).await;
    let balance_msat = wallet.balance().ok().map(|b| b.spendable_msat);
    match wallet
        .budget()
        .authorize(request.clone(), balance_msat)
        .await
    {
        Ok(permit) => Ok(permit),
        Err(BudgetError::NeedsApproval { approval_id, .. }) if wait.0.is_some() => {
            let timeout = wait.0.unwrap_or_default();
            tracing::info!(approval = %approval_id, timeout_secs = timeout.as_secs(),
                "payment waits for the creator's approval");
            let decided = approvals::wait_for_decision(wallet.db(), &approval_id, timeout).await?;
            match decided.status {
                ApprovalStatus::Approved => {
                    let balance_msat = wallet.balance().ok().map(|b| b.spendable_msat);
                    Ok(wallet.budget().authorize(request, balance_msat).await?)
                }
                ApprovalStatus::Pending => Err(WalletError::Budget(BudgetError::Denied {
                    reason: format!(
                        "the creator did not decide within {} s (approval {approval_id} stays pending; \
                         `automaton approvals approve {approval_id}` and pay again)",
                        timeout.as_secs()
                    ),
                })),
                other => Err(WalletError::Budget(BudgetError::Denied {
                    reason: format!(
                        "the creator's decision on approval {approval_id}: {other}{}",
                        decided
                            .note
                            .map(|n| format!(" ({n})"))
                            .unwrap_or_default()
                    ),
                })),
            }
        }
        Err(e) => Err(e.into()),
    }
}

fn purpose_or(given: &str, description: Option<&str>, fallback: &str) -> String {
    let given = given.trim();
    if !given.is_empty() {
        return given.chars().take(200).collect();
    }
    match description.map(str::trim).filter(|d| !d.is_empty()) {
        Some(d) => d.chars().take(200).collect(),
        None => fallback.to_string(),
    }
}
