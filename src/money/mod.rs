//! Money: the one budget gate every outgoing sat passes (caps, allow/deny lists, creator approvals, reserve floor,
//! kill switch), its reservations in the state DB, receipts, survival tiers and the inference spend cap.
//!
//! The gate is `BudgetPolicy::authorize`: it checks the request against the limits and, in the same IMMEDIATE
//! SQLite transaction, reserves `amount + max_fee` as a permit. The rolling caps are sums over the permits table
//! (reserved permits count what they may spend, settled ones what they did spend), so any number of concurrent
//! authorizations — in this process or another one on the same DB — can never overshoot a cap. The wallet's pay
//! functions take only a `Permit`; after the payment the permit is settled or released, and a crash in between is
//! repaired by `recover` on the next start.

pub mod approvals;
pub mod receipts;
pub mod routing;
pub mod tiers;

use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use chrono::{DateTime, Utc};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tracing::Instrument;

use crate::config::{env_overrides, Config, ConfigError, LimitsConfig, Override};
use crate::home::Home;
use crate::state::{new_id, Db, StateError};

pub use approvals::{Approval, ApprovalStatus};
pub use receipts::{Direction, Receipt, ReceiptStatus};
pub use tiers::SurvivalTier;

/// kv key of the kill switch: present (JSON `{since, reason}`) while the wallet is frozen.
pub const FROZEN_KEY: &str = "money.frozen";

/// How a payment moves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Rail {
    Bolt11,
    Keysend,
    Onchain,
    L402,
}

impl Rail {
    pub const ALL: [Rail; 4] = [Rail::Bolt11, Rail::Keysend, Rail::Onchain, Rail::L402];

    pub fn as_str(self) -> &'static str {
        match self {
            Rail::Bolt11 => "bolt11",
            Rail::Keysend => "keysend",
            Rail::Onchain => "onchain",
            Rail::L402 => "l402",
        }
    }
}

impl fmt::Display for Rail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Rail {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Rail::ALL
            .into_iter()
            .find(|r| r.as_str() == s.trim().to_ascii_lowercase())
            .ok_or_else(|| {
                format!("unknown rail `{s}` (expected bolt11, keysend, onchain or l402)")
            })
    }
}

/// What the agent wants to pay. `counterparty` is a node id (hex) for Lightning payments, the domain for L402 and
/// LNURL, the address for on-chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpendRequest {
    pub amount_msat: u64,
    pub max_fee_msat: u64,
    pub rail: Rail,
    /// Why. A purpose of `inference` (or starting with `inference:`) also counts against the inference cap.
    pub purpose: String,
    pub counterparty: Option<String>,
}

impl SpendRequest {
    /// The most this payment can take from the wallet: amount plus the largest fee allowed.
    pub fn total_msat(&self) -> u64 {
        self.amount_msat.saturating_add(self.max_fee_msat)
    }

    /// Paying for inference (an L402 model call): counted against `limits.inference_daily_sats` too.
    pub fn is_inference(&self) -> bool {
        is_inference_purpose(&self.purpose)
    }

    /// The counterparty as the lists and caps compare it (trimmed, lower case, no trailing dot).
    pub fn normalized_counterparty(&self) -> Option<String> {
        self.counterparty
            .as_deref()
            .map(normalize_name)
            .filter(|c| !c.is_empty())
    }

    /// Identifies "the same payment" when the agent asks again after the creator approved it.
    pub fn fingerprint(&self) -> String {
        let canonical = serde_json::json!({
            "amount_msat": self.amount_msat,
            "max_fee_msat": self.max_fee_msat,
            "rail": self.rail.as_str(),
            "purpose": self.purpose.trim(),
            "counterparty": self.normalized_counterparty(),
        });
        hex(&Sha256::digest(
            receipts::canonical_json(&canonical).as_bytes(),
        ))
    }
}

fn is_inference_purpose(purpose: &str) -> bool {
    let p = purpose.trim().to_ascii_lowercase();
    p == "inference" || p.starts_with("inference:") || p.starts_with("inference ")
}

fn normalize_name(name: &str) -> String {
    name.trim().trim_end_matches('.').to_ascii_lowercase()
}

/// Whether a list entry covers a counterparty: the same name, or a parent domain of it.
fn entry_covers(entry: &str, counterparty: &str) -> bool {
    let entry = normalize_name(entry);
    !entry.is_empty()
        && (counterparty == entry
            || (counterparty.len() > entry.len()
                && counterparty.ends_with(&entry)
                && counterparty.as_bytes()[counterparty.len() - entry.len() - 1] == b'.'))
}

/// How an interrupted payment ended, as the wallet's node knows it (for `recover`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PaymentOutcome {
    /// Paid: the permit is settled with these amounts.
    Succeeded { paid_msat: u64, fee_msat: u64 },
    /// Failed for good: the reservation is released.
    Failed,
    /// Still in flight: the reservation stays until the payment ends.
    Pending,
    /// The node never saw this payment: nothing left the wallet, the reservation is released.
    Unknown,
}

/// The right to make one payment: its reservation is already in the DB. Not `Clone`, so one permit pays once;
/// the wallet's pay functions require it and `settle`/`release` consume it.
#[derive(Debug, PartialEq, Eq)]
pub struct Permit {
    id: String,
    request: SpendRequest,
    created_at: DateTime<Utc>,
    approval_id: Option<String>,
}

impl Permit {
    /// The permit's ULID (also stored on the receipt as `permit_id`).
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn request(&self) -> &SpendRequest {
        &self.request
    }

    pub fn created_at(&self) -> DateTime<Utc> {
        self.created_at
    }

    /// What the reservation holds: amount plus the largest fee allowed.
    pub fn reserved_msat(&self) -> u64 {
        self.request.total_msat()
    }

    /// The creator's approval this permit used, if the payment needed one.
    pub fn approval_id(&self) -> Option<&str> {
        self.approval_id.as_deref()
    }
}

/// Why the gate refused a payment. Everything except `State` is a refusal by policy: nothing was paid, and the
/// CLI exits 2 (`exit_code`).
#[derive(Debug, thiserror::Error)]
pub enum BudgetError {
    #[error("the wallet is frozen{}; nothing can be paid until `automaton wallet unfreeze`", .reason.as_deref().map(|r| format!(" ({r})")).unwrap_or_default())]
    Frozen { reason: Option<String> },
    #[error("invalid payment request: {0}")]
    Invalid(String),
    #[error("refused: {reason}")]
    Denied { reason: String },
    #[error("{} exceeds the per-payment cap of {limit_sats} sats", fmt_msat(*.requested_msat))]
    OverPerPayment {
        limit_sats: u64,
        requested_msat: u64,
    },
    #[error("{} to {counterparty} would exceed its cap of {limit_sats} sats per 24 h ({} already spent or reserved)", fmt_msat(*.requested_msat), fmt_msat(*.spent_msat))]
    OverCounterparty {
        counterparty: String,
        limit_sats: u64,
        spent_msat: u64,
        requested_msat: u64,
    },
    #[error("{} would exceed the hourly cap of {limit_sats} sats ({} spent or reserved in the last hour)", fmt_msat(*.requested_msat), fmt_msat(*.spent_msat))]
    OverHourly {
        limit_sats: u64,
        spent_msat: u64,
        requested_msat: u64,
    },
    #[error("{} would exceed the daily cap of {limit_sats} sats ({} spent or reserved in the last 24 h)", fmt_msat(*.requested_msat), fmt_msat(*.spent_msat))]
    OverDaily {
        limit_sats: u64,
        spent_msat: u64,
        requested_msat: u64,
    },
    #[error("{} would exceed the daily inference cap of {limit_sats} sats ({} spent on inference in the last 24 h)", fmt_msat(*.requested_msat), fmt_msat(*.spent_msat))]
    OverInferenceDaily {
        limit_sats: u64,
        spent_msat: u64,
        requested_msat: u64,
    },
    #[error("{} would take the balance ({}, {} of it reserved for payments in flight) below the reserve floor of {reserve_sats} sats", fmt_msat(*.requested_msat), fmt_msat(*.balance_msat), fmt_msat(*.outstanding_msat))]
    BelowReserve {
        reserve_sats: u64,
        balance_msat: u64,
        outstanding_msat: u64,
        requested_msat: u64,
    },
    #[error("{} is above the approval threshold of {threshold_sats} sats: waiting for the creator (`automaton approvals approve {approval_id}`)", fmt_msat(*.requested_msat))]
    NeedsApproval {
        approval_id: String,
        threshold_sats: u64,
        requested_msat: u64,
    },
    #[error(transparent)]
    State(#[from] StateError),
}

impl BudgetError {
    /// A refusal by policy (nothing was paid), as opposed to a broken DB.
    pub fn is_refusal(&self) -> bool {
        !matches!(self, BudgetError::State(_))
    }

    /// The CLI exit code: 2 for a refusal, 1 for an error.
    pub fn exit_code(&self) -> u8 {
        if self.is_refusal() {
            2
        } else {
            1
        }
    }

    /// A short machine-readable name (`frozen`, `over_hourly`, …) for JSON answers.
    pub fn kind(&self) -> &'static str {
        match self {
            BudgetError::Frozen { .. } => "frozen",
            BudgetError::Invalid(_) => "invalid",
            BudgetError::Denied { .. } => "denied",
            BudgetError::OverPerPayment { .. } => "over_per_payment",
            BudgetError::OverCounterparty { .. } => "over_counterparty",
            BudgetError::OverHourly { .. } => "over_hourly",
            BudgetError::OverDaily { .. } => "over_daily",
            BudgetError::OverInferenceDaily { .. } => "over_inference_daily",
            BudgetError::BelowReserve { .. } => "below_reserve",
            BudgetError::NeedsApproval { .. } => "needs_approval",
            BudgetError::State(_) => "state",
        }
    }
}

/// Errors of the money bookkeeping (settling, receipts, approvals, freezing).
#[derive(Debug, thiserror::Error)]
pub enum MoneyError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("no permit {id}")]
    UnknownPermit { id: String },
    #[error("permit {id} is already {state}")]
    PermitClosed { id: String, state: String },
    #[error("the preimage does not hash to payment hash {payment_hash}")]
    PreimageMismatch { payment_hash: String },
    #[error("invalid {what}: {reason}")]
    Invalid { what: &'static str, reason: String },
    #[error("no receipt for {0}")]
    UnknownReceipt(String),
    /// The same invoice was already paid: paying it again would pay twice.
    #[error("payment {payment_hash} was already paid (receipt {receipt_id})")]
    AlreadyPaid {
        payment_hash: String,
        receipt_id: String,
    },
    /// The same invoice is being paid right now under another permit.
    #[error("payment {payment_hash} is already in flight (receipt {receipt_id})")]
    AlreadyInFlight {
        payment_hash: String,
        receipt_id: String,
    },
    #[error("no approval request matches `{0}` (see `automaton approvals list`)")]
    UnknownApproval(String),
    #[error("`{prefix}` matches several approval requests ({}); give more of the id", .ids.join(", "))]
    AmbiguousApproval { prefix: String, ids: Vec<String> },
    #[error("approval request {id} is {status}, not pending")]
    ApprovalNotPending { id: String, status: String },
    #[error(transparent)]
    Config(#[from] ConfigError),
}

fn fmt_msat(msat: u64) -> String {
    if msat.is_multiple_of(1000) {
        format!("{} sats", msat / 1000)
    } else {
        format!("{}.{:03} sats", msat / 1000, msat % 1000)
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn sats_to_msat(sats: u64) -> u64 {
    sats.saturating_mul(1000)
}

/// RFC 3339 with milliseconds and `Z`: the one format every money timestamp uses, so they compare as text.
pub(crate) fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// What has been spent (or is reserved) in the rolling windows that matter to one request.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub hour_msat: u64,
    pub day_msat: u64,
    /// Under the counterparty cap that applies to the request (0 when none applies).
    pub counterparty_day_msat: u64,
    /// Inference spend (priced calls + paid inference) in the last 24 h.
    pub inference_day_msat: u64,
    /// Reservations not yet settled or released: payments in flight.
    pub outstanding_msat: u64,
}

/// The kill switch state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Freeze {
    pub since: String,
    #[serde(default)]
    pub reason: Option<String>,
}

/// The counterparty cap that applies to `counterparty`: the most specific `counterparty_sats` entry, else
/// `per_counterparty_sats`. Returns (matching key or the counterparty itself, cap in sats, whether it is a domain
/// entry covering subdomains).
fn counterparty_cap(limits: &LimitsConfig, counterparty: &str) -> Option<(String, u64, bool)> {
    let specific = limits
        .counterparty_sats
        .iter()
        .filter(|(entry, _)| entry_covers(entry, counterparty))
        .max_by_key(|(entry, _)| normalize_name(entry).len());
    match specific {
        Some((entry, cap)) => Some((normalize_name(entry), *cap, true)),
        None => limits
            .per_counterparty_sats
            .map(|cap| (counterparty.to_string(), cap, false)),
    }
}

/// The policy itself, without the DB: every check except approvals, in the order the creator would expect
/// (kill switch, lists, per-payment, counterparty, hourly, daily, inference, reserve). Pure, so it is table-tested.
pub fn check_request(
    limits: &LimitsConfig,
    req: &SpendRequest,
    usage: &Usage,
    balance_msat: Option<u64>,
    frozen: Option<&Freeze>,
) -> Result<(), BudgetError> {
    if let Some(freeze) = frozen {
        return Err(BudgetError::Frozen {
            reason: freeze.reason.clone(),
        });
    }
    if req.amount_msat == 0 {
        return Err(BudgetError::Invalid("the amount must be above 0".into()));
    }
    if req.purpose.trim().is_empty() {
        return Err(BudgetError::Invalid("every payment needs a purpose".into()));
    }
    let total = req.total_msat();
    let counterparty = req.normalized_counterparty();
    if let Some(cp) = &counterparty {
        if let Some(entry) = limits.deny.iter().find(|e| entry_covers(e, cp)) {
            return Err(BudgetError::Denied {
                reason: format!("{cp} is on the deny list (limits.deny: {entry})"),
            });
        }
    }
    if limits.default_deny {
        let allowed = counterparty
            .as_deref()
            .is_some_and(|cp| limits.allow.iter().any(|e| entry_covers(e, cp)));
        if !allowed {
            return Err(BudgetError::Denied {
                reason: match &counterparty {
                    Some(cp) => {
                        format!("{cp} is not on the allow list and limits.default_deny is on")
                    }
                    None => {
                        "the payment names no counterparty and limits.default_deny is on".into()
                    }
                },
            });
        }
    }
    if total > sats_to_msat(limits.per_payment_sats) {
        return Err(BudgetError::OverPerPayment {
            limit_sats: limits.per_payment_sats,
            requested_msat: total,
        });
    }
    if let Some(cp) = &counterparty {
        if let Some((name, cap, _)) = counterparty_cap(limits, cp) {
            if usage.counterparty_day_msat.saturating_add(total) > sats_to_msat(cap) {
                return Err(BudgetError::OverCounterparty {
                    counterparty: name,
                    limit_sats: cap,
                    spent_msat: usage.counterparty_day_msat,
                    requested_msat: total,
                });
            }
        }
    }
    if usage.hour_msat.saturating_add(total) > sats_to_msat(limits.hourly_sats) {
        return Err(BudgetError::OverHourly {
            limit_sats: limits.hourly_sats,
            spent_msat: usage.hour_msat,
            requested_msat: total,
        });
    }
    if usage.day_msat.saturating_add(total) > sats_to_msat(limits.daily_sats) {
        return Err(BudgetError::OverDaily {
            limit_sats: limits.daily_sats,
            spent_msat: usage.day_msat,
            requested_msat: total,
        });
    }
    if let (true, Some(cap)) = (req.is_inference(), limits.inference_daily_sats) {
        if usage.inference_day_msat.saturating_add(total) > sats_to_msat(cap) {
            return Err(BudgetError::OverInferenceDaily {
                limit_sats: cap,
                spent_msat: usage.inference_day_msat,
                requested_msat: total,
            });
        }
    }
    if let Some(balance) = balance_msat {
        let available = balance.saturating_sub(usage.outstanding_msat);
        if available < total.saturating_add(sats_to_msat(limits.reserve_sats)) {
            return Err(BudgetError::BelowReserve {
                reserve_sats: limits.reserve_sats,
                balance_msat: balance,
                outstanding_msat: usage.outstanding_msat,
                requested_msat: total,
            });
        }
    }
    Ok(())
}

/// Sum of what permits created at or after `since` count: reserved ones their reservation, settled ones what
/// they paid, released ones nothing.
const PERMIT_COST: &str =
    "CASE state WHEN 'reserved' THEN reserved_msat WHEN 'settled' THEN COALESCE(paid_msat, 0) + COALESCE(fee_msat, 0) ELSE 0 END";

fn sum_u64(conn: &Connection, sql: &str, params: impl rusqlite::Params) -> rusqlite::Result<u64> {
    let v: i64 = conn
        .query_row(sql, params, |r| r.get::<_, Option<i64>>(0))?
        .unwrap_or(0);
    Ok(v.max(0) as u64)
}

/// Spend counted against the caps in the windows ending at `now`.
pub fn usage_at(
    conn: &Connection,
    limits: &LimitsConfig,
    counterparty: Option<&str>,
    now: DateTime<Utc>,
) -> rusqlite::Result<Usage> {
    let hour_ago = ts(now - chrono::Duration::hours(1));
    let day_ago = ts(now - chrono::Duration::hours(24));
    let hour_msat = sum_u64(
        conn,
        &format!("SELECT SUM({PERMIT_COST}) FROM money_permits WHERE created_at >= ?1"),
        [&hour_ago],
    )?;
    let day_msat = sum_u64(
        conn,
        &format!("SELECT SUM({PERMIT_COST}) FROM money_permits WHERE created_at >= ?1"),
        [&day_ago],
    )?;
    let counterparty_day_msat = match counterparty.and_then(|cp| counterparty_cap(limits, cp)) {
        Some((name, _, true)) => sum_u64(
            conn,
            &format!(
                "SELECT SUM({PERMIT_COST}) FROM money_permits WHERE created_at >= ?1 \
                 AND (counterparty = ?2 OR substr(counterparty, -length(?2) - 1) = '.' || ?2)"
            ),
            params![day_ago, name],
        )?,
        Some((name, _, false)) => sum_u64(
            conn,
            &format!(
                "SELECT SUM({PERMIT_COST}) FROM money_permits WHERE created_at >= ?1 AND counterparty = ?2"
            ),
            params![day_ago, name],
        )?,
        None => 0,
    };
    let inference_permits = sum_u64(
        conn,
        &format!(
            "SELECT SUM({PERMIT_COST}) FROM money_permits WHERE created_at >= ?1 \
             AND (lower(trim(purpose)) = 'inference' OR lower(trim(purpose)) LIKE 'inference:%' \
                  OR lower(trim(purpose)) LIKE 'inference %')"
        ),
        [&day_ago],
    )?;
    let inference_priced = sum_u64(
        conn,
        "SELECT SUM(cost_sats) FROM inference_calls WHERE created_at >= ?1",
        [&day_ago],
    )?;
    let outstanding_msat = sum_u64(
        conn,
        "SELECT SUM(reserved_msat) FROM money_permits WHERE state = 'reserved'",
        [],
    )?;
    Ok(Usage {
        hour_msat,
        day_msat,
        counterparty_day_msat,
        inference_day_msat: inference_permits.saturating_add(sats_to_msat(inference_priced)),
        outstanding_msat,
    })
}

/// The kill switch as stored in the DB.
pub fn frozen_state(conn: &Connection) -> rusqlite::Result<Option<Freeze>> {
    let raw = crate::state::history::kv_get(conn, FROZEN_KEY)?;
    Ok(raw.map(|text| {
        serde_json::from_str(&text).unwrap_or(Freeze {
            since: String::new(),
            reason: None,
        })
    }))
}

/// Freezes the wallet: every `authorize` is refused until `unfreeze`. Payments already in flight finish.
/// Works without a running agent (it is DB state). Returns false when it was already frozen.
pub fn freeze(db: &Db, reason: Option<&str>) -> Result<bool, MoneyError> {
    let reason = reason
        .map(str::trim)
        .filter(|r| !r.is_empty())
        .map(str::to_string);
    Ok(db.call_blocking(move |conn| {
        let freeze = Freeze {
            since: crate::state::now_rfc3339(),
            reason,
        };
        let value = serde_json::to_string(&freeze).unwrap_or_else(|_| "{}".into());
        let n = conn.execute(
            "INSERT INTO kv (key, value, updated_at) VALUES (?1, ?2, ?3) ON CONFLICT(key) DO NOTHING",
            params![FROZEN_KEY, value, freeze.since],
        )?;
        Ok(n == 1)
    })?)
}

/// Lifts the kill switch. Returns false when the wallet was not frozen.
pub fn unfreeze(db: &Db) -> Result<bool, MoneyError> {
    Ok(db.call_blocking(|conn| {
        let n = conn.execute("DELETE FROM kv WHERE key = ?1", [FROZEN_KEY])?;
        Ok(n == 1)
    })?)
}

/// Whether (and since when, why) the wallet is frozen.
pub fn frozen(db: &Db) -> Result<Option<Freeze>, MoneyError> {
    Ok(db.call_blocking(|conn| frozen_state(conn))?)
}

/// Where the policy re-reads its limits from when `automaton.yaml` changes (`budget set`, a hand edit).
struct ConfigSource {
    home: Home,
    flags: Vec<Override>,
    /// (modified time, length) of the file when last read.
    seen: Mutex<Option<(SystemTime, u64)>>,
}

/// The budget gate. Cheap to clone; all clones share the DB and the limits.
#[derive(Clone)]
pub struct BudgetPolicy {
    db: Db,
    limits: Arc<RwLock<LimitsConfig>>,
    source: Option<Arc<ConfigSource>>,
}

impl fmt::Debug for BudgetPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BudgetPolicy")
            .field("limits", &self.limits())
            .finish_non_exhaustive()
    }
}

/// What `recover` did with the reservations a crash left behind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RecoverySummary {
    pub settled: u32,
    pub released: u32,
    pub still_pending: u32,
}

/// The budget as `budget show` and the `check_budget` tool present it.
#[derive(Clone, Debug, Serialize)]
pub struct BudgetSnapshot {
    pub per_payment_sats: u64,
    pub hourly_sats: u64,
    pub daily_sats: u64,
    pub reserve_sats: u64,
    pub approval_above_sats: Option<u64>,
    pub per_counterparty_sats: Option<u64>,
    pub counterparty_sats: std::collections::BTreeMap<String, u64>,
    pub allow: Vec<String>,
    pub deny: Vec<String>,
    pub default_deny: bool,
    pub inference_daily_sats: Option<u64>,
    /// Spent or reserved in the last hour / 24 h.
    pub spent_hour_sats: u64,
    pub spent_day_sats: u64,
    pub remaining_hour_sats: u64,
    pub remaining_day_sats: u64,
    pub inference_day_sats: u64,
    /// Reserved for payments in flight.
    pub in_flight_sats: u64,
    pub frozen: bool,
    pub frozen_since: Option<String>,
    pub frozen_reason: Option<String>,
    pub pending_approvals: u32,
    pub tier: SurvivalTier,
    /// Last balance the wallet reported (kv `money.balance_sats`).
    pub balance_sats: Option<u64>,
}

/// Reads the budget state off a connection (shared by `BudgetPolicy::snapshot` and the CLI).
pub fn snapshot_of(conn: &Connection, limits: &LimitsConfig) -> rusqlite::Result<BudgetSnapshot> {
    let now = Utc::now();
    let usage = usage_at(conn, limits, None, now)?;
    let freeze = frozen_state(conn)?;
    let pending: i64 = conn.query_row(
        "SELECT count(*) FROM money_approvals WHERE status = 'pending' AND expires_at > ?1",
        [ts(now)],
        |r| r.get(0),
    )?;
    let tier = tiers::tier_of(conn)?;
    let balance_sats = crate::state::history::kv_get(conn, tiers::BALANCE_KEY)?
        .and_then(|v| v.parse::<u64>().ok());
    let up = |msat: u64| msat.div_ceil(1000);
    Ok(BudgetSnapshot {
        per_payment_sats: limits.per_payment_sats,
        hourly_sats: limits.hourly_sats,
        daily_sats: limits.daily_sats,
        reserve_sats: limits.reserve_sats,
        approval_above_sats: limits.approval_above_sats,
        per_counterparty_sats: limits.per_counterparty_sats,
        counterparty_sats: limits.counterparty_sats.clone(),
        allow: limits.allow.clone(),
        deny: limits.deny.clone(),
        default_deny: limits.default_deny,
        inference_daily_sats: limits.inference_daily_sats,
        spent_hour_sats: up(usage.hour_msat),
        spent_day_sats: up(usage.day_msat),
        remaining_hour_sats: limits.hourly_sats.saturating_sub(up(usage.hour_msat)),
        remaining_day_sats: limits.daily_sats.saturating_sub(up(usage.day_msat)),
        inference_day_sats: up(usage.inference_day_msat),
        in_flight_sats: up(usage.outstanding_msat),
        frozen: freeze.is_some(),
        frozen_since: freeze.as_ref().map(|f| f.since.clone()),
        frozen_reason: freeze.and_then(|f| f.reason),
        pending_approvals: pending.max(0) as u32,
        tier,
        balance_sats,
    })
}

impl BudgetPolicy {
    /// The gate over `db` with fixed `limits` (tests, and callers that reload themselves).
    pub fn new(db: Db, limits: LimitsConfig) -> Self {
        BudgetPolicy {
            db,
            limits: Arc::new(RwLock::new(limits)),
            source: None,
        }
    }

    /// The gate of a running agent: limits come from `config` and are re-read from the home's `automaton.yaml`
    /// (with the same `-c` flags) whenever the file changes, so `automaton budget set` takes effect at once.
    /// A file that no longer loads keeps the last good limits (and says so in the log).
    pub fn from_home(db: Db, config: &Config, home: &Home, flags: Vec<Override>) -> Self {
        let seen = file_stamp(&home.config_path());
        BudgetPolicy {
            db,
            limits: Arc::new(RwLock::new(config.limits.clone())),
            source: Some(Arc::new(ConfigSource {
                home: home.clone(),
                flags,
                seen: Mutex::new(seen),
            })),
        }
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    /// The limits in force now (after a reload if the config file changed).
    pub fn limits(&self) -> LimitsConfig {
        self.reload_if_changed();
        match self.limits.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Replaces the limits in force (the file is not touched).
    pub fn set_limits(&self, limits: LimitsConfig) {
        match self.limits.write() {
            Ok(mut guard) => *guard = limits,
            Err(poisoned) => *poisoned.into_inner() = limits,
        }
    }

    fn reload_if_changed(&self) {
        let Some(source) = &self.source else { return };
        let path = source.home.config_path();
        let stamp = file_stamp(&path);
        let Ok(mut seen) = source.seen.lock() else {
            return;
        };
        if stamp.is_none() || *seen == stamp {
            return;
        }
        *seen = stamp;
        match Config::load_with(&source.home, &env_overrides(), &source.flags) {
            Ok(config) => {
                tracing::info!(path = %path.display(), "budget limits reloaded");
                self.set_limits(config.limits);
            }
            Err(err) => {
                tracing::warn!(error = %err, "config changed but does not load; keeping the previous budget limits")
            }
        }
    }

    /// Reserves `amount + max_fee` in the DB (one IMMEDIATE transaction, so concurrent calls never overshoot)
    /// and returns a permit, or says why not. `balance_msat` is the spendable balance the reserve floor is checked
    /// against (`None`: unknown, the floor is not checked). A request above the approval threshold is recorded
    /// for the creator and refused with `NeedsApproval`; asked again after approval, it passes exactly once.
    pub async fn authorize(
        &self,
        req: SpendRequest,
        balance_msat: Option<u64>,
    ) -> Result<Permit, BudgetError> {
        let limits = self.limits();
        let span =
            tracing::info_span!("authorize", rail = %req.rail, amount_msat = req.amount_msat);
        let permit = self
            .db
            .call(move |conn| authorize_in(conn, &limits, req, balance_msat, Utc::now()))
            .instrument(span)
            .await??;
        tracing::info!(
            permit = %permit.id,
            reserved_msat = permit.reserved_msat(),
            purpose = %permit.request.purpose,
            "payment authorized"
        );
        Ok(permit)
    }

    /// The payment went through: the permit now counts what was really paid (amount + fee).
    /// Settling a permit that is already settled (the wallet's event pump got there first) is a no-op.
    pub async fn settle(
        &self,
        permit: Permit,
        paid_msat: u64,
        fee_msat: u64,
    ) -> Result<(), MoneyError> {
        let id = permit.id;
        self.db
            .call(move |conn| {
                close_permit(
                    conn,
                    &id,
                    Close::Settle {
                        paid_msat,
                        fee_msat,
                    },
                )
            })
            .await??;
        Ok(())
    }

    /// The payment did not happen: the reservation is given back.
    /// Releasing a permit that is already released is a no-op.
    pub async fn release(&self, permit: Permit) -> Result<(), MoneyError> {
        let id = permit.id;
        self.db
            .call(move |conn| close_permit(conn, &id, Close::Release))
            .await??;
        Ok(())
    }

    /// On start: reservations left by a crash are settled or released by asking `resolve(payment_hash)` how the
    /// payment ended. A permit whose payment was never launched (no payment hash recorded) is released.
    pub async fn recover(
        &self,
        resolve: impl Fn(&str) -> PaymentOutcome,
    ) -> Result<RecoverySummary, MoneyError> {
        let open: Vec<(String, Option<String>)> = self
            .db
            .call(|conn| {
                let mut stmt = conn.prepare(
                    "SELECT id, payment_hash FROM money_permits WHERE state = 'reserved' ORDER BY created_at",
                )?;
                let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
                rows.collect()
            })
            .await?;
        let mut summary = RecoverySummary::default();
        for (id, hash) in open {
            let close = match hash.as_deref().map(&resolve) {
                None | Some(PaymentOutcome::Failed) | Some(PaymentOutcome::Unknown) => {
                    Close::Release
                }
                Some(PaymentOutcome::Succeeded {
                    paid_msat,
                    fee_msat,
                }) => Close::Settle {
                    paid_msat,
                    fee_msat,
                },
                Some(PaymentOutcome::Pending) => {
                    summary.still_pending += 1;
                    continue;
                }
            };
            match close {
                Close::Release => summary.released += 1,
                Close::Settle { .. } => summary.settled += 1,
            }
            tracing::info!(permit = %id, payment_hash = ?hash, action = ?close, "recovered a reservation left by a crash");
            let id2 = id.clone();
            self.db
                .call(move |conn| close_permit(conn, &id2, close))
                .await??;
        }
        Ok(summary)
    }

    /// Fails when the daily inference cap is spent (the inference router calls this before each model call).
    pub async fn check_inference(&self) -> Result<(), BudgetError> {
        let limits = self.limits();
        let Some(cap) = limits.inference_daily_sats else {
            return Ok(());
        };
        let usage = self
            .db
            .call(move |conn| usage_at(conn, &limits, None, Utc::now()))
            .await?;
        if usage.inference_day_msat >= sats_to_msat(cap) {
            return Err(BudgetError::OverInferenceDaily {
                limit_sats: cap,
                spent_msat: usage.inference_day_msat,
                requested_msat: 0,
            });
        }
        Ok(())
    }

    /// Limits, spend in the windows, approvals waiting, freeze and tier.
    pub async fn snapshot(&self) -> Result<BudgetSnapshot, MoneyError> {
        let limits = self.limits();
        Ok(self.db.call(move |conn| snapshot_of(conn, &limits)).await?)
    }
}

fn file_stamp(path: &std::path::Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

#[derive(Clone, Copy, Debug)]
enum Close {
    Settle { paid_msat: u64, fee_msat: u64 },
    Release,
}

impl Close {
    fn state(self) -> &'static str {
        match self {
            Close::Settle { .. } => "settled",
            Close::Release => "released",
        }
    }
}

/// Closes a reserved permit. Closing it again the same way is a no-op; the other way is an error.
fn close_permit(
    conn: &mut Connection,
    id: &str,
    close: Close,
) -> rusqlite::Result<Result<(), MoneyError>> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let state: Option<String> = tx
        .query_row("SELECT state FROM money_permits WHERE id = ?1", [id], |r| {
            r.get(0)
        })
        .optional()?;
    let result = match state.as_deref() {
        None => Err(MoneyError::UnknownPermit { id: id.to_string() }),
        Some("reserved") => {
            let (paid, fee) = match close {
                Close::Settle {
                    paid_msat,
                    fee_msat,
                } => (Some(paid_msat as i64), Some(fee_msat as i64)),
                Close::Release => (None, None),
            };
            tx.execute(
                "UPDATE money_permits SET state = ?2, paid_msat = ?3, fee_msat = ?4, closed_at = ?5 WHERE id = ?1",
                params![id, close.state(), paid, fee, crate::state::now_rfc3339()],
            )?;
            Ok(())
        }
        Some(s) if s == close.state() => Ok(()),
        Some(s) => Err(MoneyError::PermitClosed {
            id: id.to_string(),
            state: s.to_string(),
        }),
    };
    tx.commit()?;
    Ok(result)
}

/// The gate's transaction: checks, approvals, and the reservation, all under one write lock.
fn authorize_in(
    conn: &mut Connection,
    limits: &LimitsConfig,
    mut req: SpendRequest,
    balance_msat: Option<u64>,
    now: DateTime<Utc>,
) -> rusqlite::Result<Result<Permit, BudgetError>> {
    req.counterparty = req.normalized_counterparty();
    req.purpose = req.purpose.trim().to_string();
    // IMMEDIATE takes the write lock before the sums are read, so no other writer can reserve in between.
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let freeze = frozen_state(&tx)?;
    let usage = usage_at(&tx, limits, req.counterparty.as_deref(), now)?;
    if let Err(refusal) = check_request(limits, &req, &usage, balance_msat, freeze.as_ref()) {
        tx.commit()?;
        tracing::info!(reason = refusal.kind(), "payment refused: {refusal}");
        return Ok(Err(refusal));
    }
    let mut approval_id = None;
    if let Some(threshold) = limits.approval_above_sats {
        if req.total_msat() > sats_to_msat(threshold) {
            match approvals::gate(&tx, &req, threshold, now)? {
                approvals::Gate::Approved(id) => approval_id = Some(id),
                approvals::Gate::Refused(refusal) => {
                    tx.commit()?;
                    tracing::info!(
                        reason = refusal.kind(),
                        "payment waits or was refused: {refusal}"
                    );
                    return Ok(Err(refusal));
                }
            }
        }
    }
    let permit = Permit {
        id: new_id(),
        request: req,
        created_at: now,
        approval_id,
    };
    let r = &permit.request;
    tx.execute(
        "INSERT INTO money_permits (id, rail, amount_msat, max_fee_msat, reserved_msat, purpose, counterparty, \
         state, approval_id, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'reserved', ?8, ?9)",
        params![
            permit.id,
            r.rail.as_str(),
            r.amount_msat as i64,
            r.max_fee_msat as i64,
            r.total_msat() as i64,
            r.purpose,
            r.counterparty,
            permit.approval_id,
            ts(now),
        ],
    )?;
    if let Some(approval) = &permit.approval_id {
        approvals::mark_used(&tx, approval, &permit.id, now)?;
    }
    tx.commit()?;
    Ok(Ok(permit))
}

#[cfg(test)]
mod tests;
