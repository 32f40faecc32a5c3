//! A child pays its own rent. LNVPS renewals need the owner's key (the parent's), so a child tops up the VM it
//! lives on through the VM's LNURL-pay endpoint (`/.well-known/lnurlp/{vm_id}`, no account), from its own wallet
//! through its budget gate (purpose `compute.rent`). The invoice is kept before paying: a top-up interrupted after
//! paying is recognised by its receipt, never paid again.

use chrono::{DateTime, Utc};

use super::ReplicationError;
use crate::compute::lnvps::RentPayer;
use crate::config::Config;
use crate::money::tiers::SurvivalTier;
use crate::state::{history, Db};

/// kv: until when the child's VM is paid (RFC 3339), after the top-ups it made.
pub const PAID_UNTIL_KEY: &str = "replication.own_vm.paid_until";
/// kv: the top-up invoice being paid.
const PENDING_KEY: &str = "replication.own_vm.pending_invoice";

async fn kv(db: &Db, key: &'static str) -> Result<Option<String>, ReplicationError> {
    Ok(db.call(move |c| history::kv_get(c, key)).await?)
}

async fn kv_clear(db: &Db, key: &'static str) -> Result<(), ReplicationError> {
    db.call(move |c| c.execute("DELETE FROM kv WHERE key = ?1", [key]))
        .await?;
    Ok(())
}

fn parse_time(text: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// Tops up the child's own VM when it expires within `own_vm.lead_secs`. Returns one line for the heartbeat's
/// history; `None` when this agent has no VM of its own.
pub async fn topup_due(
    config: &Config,
    db: &Db,
    payer: &dyn RentPayer,
) -> Result<Option<String>, ReplicationError> {
    let Some(vm) = &config.replication.own_vm else {
        return Ok(None);
    };
    let paid_until = kv(db, PAID_UNTIL_KEY)
        .await?
        .as_deref()
        .and_then(parse_time)
        .or_else(|| parse_time(&vm.paid_until))
        .unwrap_or_else(Utc::now);
    // A top-up paid by an earlier run that died before recording it.
    if let Some(pending) = kv(db, PENDING_KEY).await? {
        let hash = crate::wallet::payment_hash_of(&pending)
            .map_err(|e| ReplicationError::Failed(e.to_string()))?;
        let status: Option<String> = {
            use rusqlite::OptionalExtension;
            let hash = hash.clone();
            db.call(move |c| {
                c.query_row(
                    "SELECT status FROM receipts WHERE payment_hash = ?1 AND direction = 'out'",
                    [hash],
                    |r| r.get(0),
                )
                .optional()
            })
            .await?
        };
        match status.as_deref() {
            Some("succeeded") => {
                let until = extend(db, paid_until, vm.topup_secs).await?;
                return Ok(Some(format!(
                    "VM {} top-up {hash} was paid; paid until {until}",
                    vm.id
                )));
            }
            Some("pending") => {
                return Ok(Some(format!("VM {} top-up {hash} is in flight", vm.id)));
            }
            _ if !expired(&pending) => {
                return pay(config, db, payer, &pending, paid_until).await.map(Some)
            }
            _ => kv_clear(db, PENDING_KEY).await?,
        }
    }
    let left = (paid_until - Utc::now()).num_seconds();
    if left > vm.lead_secs as i64 {
        return Ok(Some(format!(
            "VM {} is paid until {}; nothing due",
            vm.id,
            paid_until.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        )));
    }
    let tier = crate::money::tiers::load_tier(db).await?;
    if tier >= SurvivalTier::Critical {
        return Ok(Some(format!(
            "VM {} expires {}, but the tier is {}: no top-up",
            vm.id,
            paid_until.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            tier.as_str()
        )));
    }
    let request = crate::lnurl::pay::pay_request(&vm.lnurlp, &config.wallet.network)
        .await
        .map_err(|e| ReplicationError::Failed(format!("VM {} top-up: {e}", vm.id)))?;
    let bolt11 = crate::lnurl::pay::invoice(&request, vm.topup_sats.saturating_mul(1000))
        .await
        .map_err(|e| ReplicationError::Failed(format!("VM {} top-up: {e}", vm.id)))?;
    let pending = bolt11.clone();
    db.call(move |c| history::kv_set(c, PENDING_KEY, &pending))
        .await?;
    pay(config, db, payer, &bolt11, paid_until).await.map(Some)
}

async fn pay(
    config: &Config,
    db: &Db,
    payer: &dyn RentPayer,
    bolt11: &str,
    paid_until: DateTime<Utc>,
) -> Result<String, ReplicationError> {
    let Some(vm) = &config.replication.own_vm else {
        return Err(ReplicationError::Failed("no VM of my own".into()));
    };
    let hash = payer
        .pay(bolt11, crate::compute::lnvps::RENT_PURPOSE)
        .await
        .map_err(|e| {
            ReplicationError::PaymentFailed(format!("VM {} top-up not paid: {e}", vm.id))
        })?;
    let until = extend(db, paid_until, vm.topup_secs).await?;
    Ok(format!(
        "VM {} topped up with {} sats (payment {hash}); paid until {until}",
        vm.id, vm.topup_sats
    ))
}

/// Records `topup_secs` more of paid time and forgets the pending invoice, in one transaction (a crash between
/// the two would count the top-up twice).
async fn extend(db: &Db, paid_until: DateTime<Utc>, secs: u64) -> Result<String, ReplicationError> {
    let secs = chrono::Duration::try_seconds(secs.min(i64::MAX as u64 / 1000) as i64)
        .unwrap_or_else(|| chrono::Duration::days(3650));
    let until =
        (paid_until.max(Utc::now()) + secs).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let value = until.clone();
    db.call(move |c| {
        let tx = rusqlite::Transaction::new_unchecked(c, rusqlite::TransactionBehavior::Immediate)?;
        history::kv_set(&tx, PAID_UNTIL_KEY, &value)?;
        tx.execute("DELETE FROM kv WHERE key = ?1", [PENDING_KEY])?;
        tx.commit()
    })
    .await?;
    Ok(until)
}

fn expired(bolt11: &str) -> bool {
    crate::wallet::invoice_expires_at(bolt11).is_none_or(|at| at <= Utc::now())
}
