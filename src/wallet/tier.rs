//! Keeps the survival tier current: after every balance change and periodically, the wallet's spendable balance
//! goes through `money::tiers::update_tier`, which stores it with the tier in kv for the scheduler, `status` and
//! the agent loop (none of which talk to the node).

use super::{NodeState, Wallet, WalletError};
use crate::money::tiers::{self, TierUpdate};

/// How long after the node starts its channels get to become usable again before an unusable one counts as lost.
const SETTLE_GRACE: chrono::TimeDelta = chrono::TimeDelta::minutes(2);

impl Wallet {
    /// Records the balance (unknown while the node is down: that counts as `normal`) and recomputes the tier.
    /// While a channel that was ready is not usable yet just after a start, the spendable balance reads low though
    /// the money is there: the last recorded balance stands (`None`), so a restart never looks like poverty (which
    /// would slow the heartbeat, switch models, or let rented machines go).
    pub(super) async fn update_tier(&self) -> Result<Option<TierUpdate>, WalletError> {
        // Past a grace after start, an unusable channel is a real loss of spendable money (peer gone), not a
        // reconnect in progress: then the balance counts as it reads.
        let settling = match self.state() {
            NodeState::Running { since } => chrono::DateTime::parse_from_rfc3339(&since)
                .map(|at| chrono::Utc::now().signed_duration_since(at) < SETTLE_GRACE)
                .unwrap_or(false),
            _ => false,
        };
        if settling && !self.channels_usable() {
            tracing::debug!(
                "a ready channel is not usable yet: the survival tier keeps the last balance"
            );
            return Ok(None);
        }
        let balance = self.balance().ok().map(|b| b.balance_sats);
        let thresholds = self.inner.budget.limits().tiers;
        // `update_tier` logs a change itself.
        Ok(Some(
            tiers::update_tier(&self.inner.db, balance, &thresholds).await?,
        ))
    }

    /// Waits (at most `limit`) until every channel holding our money is usable, so a payment made just after a
    /// start is measured against the real balance, not against channels still re-establishing with their peer.
    pub(crate) async fn wait_spendable(&self, limit: std::time::Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        // After a restart a channel may also be usable but unable to send for a moment (an interrupted payment's
        // HTLC is still being failed back): money in channels with nothing spendable means "not yet".
        // Money in a channel that is closing (a force close) is never spendable here: it does not count.
        let settled = |w: &Wallet| {
            w.channels_usable()
                && w.balance()
                    .map(|b| {
                        b.lightning_sats.saturating_sub(b.closing_sats) == 0 || b.spendable_msat > 0
                    })
                    .unwrap_or(true)
        };
        while !settled(self) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    /// True when every channel that holds our money (or completed its opening) is usable.
    fn channels_usable(&self) -> bool {
        self.inner.node.get().is_none_or(|node| {
            node.list_channels()
                .iter()
                .all(|c| c.is_usable || (!c.is_channel_ready && c.outbound_capacity_msat == 0))
        })
    }
}
