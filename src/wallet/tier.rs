//! Keeps the survival tier current: after every balance change and periodically, the wallet's spendable balance
//! goes through `money::tiers::update_tier`, which stores it with the tier in kv for the scheduler, `status` and
//! the agent loop (none of which talk to the node).

use super::{Wallet, WalletError};
use crate::money::tiers::{self, TierUpdate};

impl Wallet {
    /// Records the balance (unknown while the node is down: that counts as `normal`) and recomputes the tier.
    pub(super) async fn update_tier(&self) -> Result<TierUpdate, WalletError> {
        let balance = self.balance().ok().map(|b| b.balance_sats);
        let thresholds = self.inner.budget.limits().tiers;
        // `update_tier` logs a change itself.
        Ok(tiers::update_tier(&self.inner.db, balance, &thresholds).await?)
    }
}
