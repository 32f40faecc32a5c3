//! Survival tiers in sats: how the agent lives given its balance and runway (balance ÷ trailing daily burn).
//!
//! The wallet reports its balance with `update_tier` (often; it is idempotent); the tier is stored in kv
//! `money.tier` (+ `money.balance_sats`, `money.tier_changed_at`) so the scheduler, `status` and the agent loop
//! read it without talking to the node. Entering `critical` or `dead` after the agent has been funded records a
//! distress wake event; coming back from `dead` records a resurrection one.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use rusqlite::{params, Connection};
use serde::{Deserialize, Serialize};

use super::{ts, MoneyError};
pub use crate::config::TierThresholds;
use crate::state::history::kv_get;
use crate::state::{Db, StateError};

pub const TIER_KEY: &str = "money.tier";
pub const BALANCE_KEY: &str = "money.balance_sats";
pub const TIER_CHANGED_KEY: &str = "money.tier_changed_at";
/// Set once the balance has been above zero: a never-funded agent is critical but sends no distress.
pub const EVER_FUNDED_KEY: &str = "money.ever_funded";
/// When the balance was first seen at zero (after having been funded): the dead grace period counts from here.
pub const ZERO_SINCE_KEY: &str = "money.zero_since";
/// When the last distress event was recorded.
pub const DISTRESS_KEY: &str = "money.distress_at";

/// Ordered from best to worst off.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SurvivalTier {
    High,
    Normal,
    LowCompute,
    Critical,
    Dead,
}

impl SurvivalTier {
    pub const ALL: [SurvivalTier; 5] = [
        SurvivalTier::High,
        SurvivalTier::Normal,
        SurvivalTier::LowCompute,
        SurvivalTier::Critical,
        SurvivalTier::Dead,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SurvivalTier::High => "high",
            SurvivalTier::Normal => "normal",
            SurvivalTier::LowCompute => "low_compute",
            SurvivalTier::Critical => "critical",
            SurvivalTier::Dead => "dead",
        }
    }

    /// One tier worse off, but never below `critical` (only a zero balance kills).
    fn lowered(self) -> SurvivalTier {
        match self {
            SurvivalTier::High => SurvivalTier::Normal,
            SurvivalTier::Normal => SurvivalTier::LowCompute,
            other => other.max(SurvivalTier::Critical),
        }
    }

    /// Expensive (dangerous) tools are off in this tier.
    pub fn restricts_dangerous_tools(self) -> bool {
        self >= SurvivalTier::Critical
    }
}

impl fmt::Display for SurvivalTier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SurvivalTier {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SurvivalTier::ALL
            .into_iter()
            .find(|t| t.as_str() == s.trim())
            .ok_or_else(|| format!("unknown survival tier `{s}`"))
    }
}

/// What the tier is computed from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TierInputs {
    /// Spendable balance (Lightning + on-chain); `None` when unknown (no chain source): counts as `normal`.
    pub balance_sats: Option<u64>,
    /// Trailing daily burn (payments + inference) in sats.
    pub daily_burn_sats: u64,
    pub ever_funded: bool,
    /// Since when the balance has been zero (after having been funded).
    pub zero_since: Option<DateTime<Utc>>,
    pub now: DateTime<Utc>,
}

/// Runway shorter than this lowers the tier by one.
const SHORT_RUNWAY_DAYS: u64 = 1;
/// Runway shorter than this rules out `high`.
const HIGH_RUNWAY_DAYS: u64 = 7;

/// The tier for `inputs`: by balance thresholds, refined by runway (under a day of runway → one tier lower, never
/// below critical; under a week → not high); zero balance → critical, dead after the grace period; a never-funded
/// agent is critical; an unknown balance is normal.
pub fn compute_tier(inputs: &TierInputs, thresholds: &TierThresholds) -> SurvivalTier {
    let Some(balance) = inputs.balance_sats else {
        return SurvivalTier::Normal;
    };
    if balance == 0 {
        let grace =
            chrono::Duration::seconds(thresholds.dead_grace_secs.min(i64::MAX as u64) as i64);
        return match inputs.zero_since {
            Some(since) if inputs.ever_funded && inputs.now - since >= grace => SurvivalTier::Dead,
            _ => SurvivalTier::Critical,
        };
    }
    let mut tier = if balance >= thresholds.high_sats {
        SurvivalTier::High
    } else if balance >= thresholds.normal_sats {
        SurvivalTier::Normal
    } else if balance >= thresholds.low_compute_sats {
        SurvivalTier::LowCompute
    } else {
        SurvivalTier::Critical
    };
    if let Some(runway_days) = balance.checked_div(inputs.daily_burn_sats) {
        if runway_days < HIGH_RUNWAY_DAYS && tier == SurvivalTier::High {
            tier = SurvivalTier::Normal;
        }
        if runway_days < SHORT_RUNWAY_DAYS {
            tier = tier.lowered();
        }
    }
    tier
}

/// How much slower the heartbeat runs in a tier (its intervals are multiplied by this).
pub fn heartbeat_multiplier(tier: SurvivalTier) -> f64 {
    match tier {
        SurvivalTier::High | SurvivalTier::Normal => 1.0,
        SurvivalTier::LowCompute => 2.0,
        SurvivalTier::Critical => 4.0,
        SurvivalTier::Dead => 8.0,
    }
}

/// The agent card's status word for a tier: `alive | low | critical | dead`.
pub fn card_status(tier: SurvivalTier) -> &'static str {
    match tier {
        SurvivalTier::High | SurvivalTier::Normal => "alive",
        SurvivalTier::LowCompute => "low",
        SurvivalTier::Critical => "critical",
        SurvivalTier::Dead => "dead",
    }
}

/// The model to ask in `tier`: the tier's own entry in `inference.tier_models`, else the nearest better-off
/// tier's entry down to `normal`, else `inference.model`. (A `critical` agent with only a `low_compute` model
/// configured uses that cheaper model, not the default.)
pub fn model_for_tier(config: &crate::config::InferenceConfig, tier: SurvivalTier) -> String {
    let m = &config.tier_models;
    let chain: &[&Option<String>] = match tier {
        SurvivalTier::High => &[&m.high],
        SurvivalTier::Normal => &[&m.normal],
        SurvivalTier::LowCompute => &[&m.low_compute],
        SurvivalTier::Critical => &[&m.critical, &m.low_compute],
        SurvivalTier::Dead => &[&m.dead, &m.critical, &m.low_compute],
    };
    chain
        .iter()
        .find_map(|m| m.as_deref().map(str::trim).filter(|s| !s.is_empty()))
        .map(str::to_string)
        .unwrap_or_else(|| config.model.clone())
}

/// The stored tier (`normal` when none is stored yet) off a connection.
pub fn tier_of(conn: &Connection) -> rusqlite::Result<SurvivalTier> {
    Ok(kv_get(conn, TIER_KEY)?
        .and_then(|v| v.parse().ok())
        .unwrap_or(SurvivalTier::Normal))
}

/// The current tier as last stored; `normal` when unset or unreadable (the scheduler and status use this).
pub fn current_tier(db: &Db) -> SurvivalTier {
    match db.call_blocking(|c| tier_of(c)) {
        Ok(tier) => tier,
        Err(err) => {
            tracing::warn!(error = %err, "cannot read the survival tier; assuming normal");
            SurvivalTier::Normal
        }
    }
}

/// The current tier, off the executor.
pub async fn load_tier(db: &Db) -> Result<SurvivalTier, StateError> {
    db.call(|c| tier_of(c)).await
}

/// What `update_tier` found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TierUpdate {
    pub tier: SurvivalTier,
    pub previous: SurvivalTier,
    pub changed: bool,
    pub daily_burn_sats: u64,
    /// A distress wake event was recorded (entered critical or dead after having been funded).
    pub distress: bool,
    /// Came back from dead.
    pub resurrected: bool,
}

/// Trailing daily burn: the larger of the last 24 h and the 7-day average of money spent through the gate
/// (settled permits) plus priced inference.
pub fn daily_burn_sats(conn: &Connection, now: DateTime<Utc>) -> rusqlite::Result<u64> {
    let spent_since = |since: DateTime<Utc>| -> rusqlite::Result<u64> {
        let permits: i64 = conn.query_row(
            "SELECT COALESCE(SUM(COALESCE(paid_msat, 0) + COALESCE(fee_msat, 0)), 0) FROM money_permits \
             WHERE state = 'settled' AND created_at >= ?1",
            [ts(since)],
            |r| r.get(0),
        )?;
        let inference: i64 = conn.query_row(
            "SELECT COALESCE(SUM(cost_sats), 0) FROM inference_calls WHERE created_at >= ?1",
            [ts(since)],
            |r| r.get(0),
        )?;
        Ok((permits.max(0) as u64).div_ceil(1000) + inference.max(0) as u64)
    };
    let day = spent_since(now - chrono::Duration::hours(24))?;
    let week = spent_since(now - chrono::Duration::days(7))?;
    Ok(day.max(week.div_ceil(7)))
}

/// Records the wallet's latest balance (`None`: unknown) and recomputes the tier. Call it whenever the balance
/// may have changed and periodically (the dead grace period runs out without any event). Idempotent.
pub async fn update_tier(
    db: &Db,
    balance_sats: Option<u64>,
    thresholds: &TierThresholds,
) -> Result<TierUpdate, MoneyError> {
    let thresholds = thresholds.clone();
    Ok(db
        .call(move |c| update_tier_at(c, balance_sats, &thresholds, Utc::now()))
        .await?)
}

fn kv_set(conn: &Connection, key: &str, value: &str, now: &str) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO kv (key, value, updated_at) VALUES (?1, ?2, ?3) \
         ON CONFLICT(key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
        params![key, value, now],
    )?;
    Ok(())
}

/// `update_tier` at a given time, on a connection (one transaction).
pub fn update_tier_at(
    conn: &mut Connection,
    balance_sats: Option<u64>,
    thresholds: &TierThresholds,
    now: DateTime<Utc>,
) -> rusqlite::Result<TierUpdate> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let now_text = ts(now);
    let stored = kv_get(&tx, TIER_KEY)?.and_then(|v| v.parse::<SurvivalTier>().ok());
    let previous = stored.unwrap_or(SurvivalTier::Normal);
    let mut ever_funded = kv_get(&tx, EVER_FUNDED_KEY)?.is_some();
    let mut zero_since = kv_get(&tx, ZERO_SINCE_KEY)?
        .and_then(|v| DateTime::parse_from_rfc3339(&v).ok())
        .map(|t| t.with_timezone(&Utc));
    match balance_sats {
        Some(0) if ever_funded && zero_since.is_none() => {
            zero_since = Some(now);
            kv_set(&tx, ZERO_SINCE_KEY, &now_text, &now_text)?;
        }
        Some(b) if b > 0 => {
            if !ever_funded {
                ever_funded = true;
                kv_set(&tx, EVER_FUNDED_KEY, &now_text, &now_text)?;
            }
            if zero_since.take().is_some() {
                tx.execute("DELETE FROM kv WHERE key = ?1", [ZERO_SINCE_KEY])?;
            }
        }
        _ => {}
    }
    if let Some(b) = balance_sats {
        kv_set(&tx, BALANCE_KEY, &b.to_string(), &now_text)?;
    }
    let daily_burn = daily_burn_sats(&tx, now)?;
    let tier = compute_tier(
        &TierInputs {
            balance_sats,
            daily_burn_sats: daily_burn,
            ever_funded,
            zero_since,
            now,
        },
        thresholds,
    );
    let changed = stored != Some(tier);
    let mut distress = false;
    let mut resurrected = false;
    if changed {
        kv_set(&tx, TIER_KEY, tier.as_str(), &now_text)?;
        kv_set(&tx, TIER_CHANGED_KEY, &now_text, &now_text)?;
        let balance_text = balance_sats
            .map(|b| format!("{b} sats"))
            .unwrap_or_else(|| "unknown".into());
        let worse = tier > previous || stored.is_none();
        if ever_funded && worse && tier >= SurvivalTier::Critical {
            distress = true;
            let reason = format!(
                "distress: survival tier is now {tier} (was {previous}); balance {balance_text}, daily burn {daily_burn} sats. \
                 Ask for funds or cut spending: dangerous tools are disabled until the balance recovers."
            );
            tx.execute(
                "INSERT INTO wake_events (source, reason, created_at) VALUES ('wallet', ?1, ?2)",
                params![reason, now_text],
            )?;
            kv_set(&tx, DISTRESS_KEY, &now_text, &now_text)?;
        }
        if previous == SurvivalTier::Dead && tier < SurvivalTier::Dead && stored.is_some() {
            resurrected = true;
            tx.execute(
                "INSERT INTO wake_events (source, reason, created_at) VALUES ('wallet', ?1, ?2)",
                params![
                    format!("resurrected: funds arrived (balance {balance_text}); survival tier is now {tier}"),
                    now_text
                ],
            )?;
        }
        tracing::info!(%tier, %previous, balance_sats = ?balance_sats, daily_burn, "survival tier changed");
    }
    tx.commit()?;
    Ok(TierUpdate {
        tier,
        previous,
        changed,
        daily_burn_sats: daily_burn,
        distress,
        resurrected,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::InferenceConfig;

    fn at(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000 + secs, 0).unwrap()
    }

    #[test]
    fn tier_table() {
        use SurvivalTier::*;
        let t = TierThresholds::default();
        let grace = t.dead_grace_secs as i64;
        // (balance, burn/day, ever funded, zero since (secs before now), expected)
        type Case = (Option<u64>, u64, bool, Option<i64>, SurvivalTier);
        let cases: Vec<Case> = vec![
            (None, 0, true, None, Normal),
            (None, 0, false, None, Normal),
            (Some(0), 0, false, None, Critical),
            (Some(0), 0, true, None, Critical),
            (Some(0), 0, true, Some(grace - 1), Critical),
            (Some(0), 0, true, Some(grace), Dead),
            (Some(0), 0, false, Some(grace * 10), Critical),
            (Some(1), 0, true, None, Critical),
            (Some(4_999), 0, true, None, Critical),
            (Some(5_000), 0, true, None, LowCompute),
            (Some(19_999), 0, true, None, LowCompute),
            (Some(20_000), 0, true, None, Normal),
            (Some(999_999), 0, true, None, Normal),
            (Some(1_000_000), 0, true, None, High),
            // Runway: under a week rules out high; under a day lowers one tier (never below critical).
            (Some(1_000_000), 100_000, true, None, High),
            (Some(1_000_000), 200_000, true, None, Normal),
            (Some(1_000_000), 2_000_000, true, None, LowCompute),
            (Some(50_000), 60_000, true, None, LowCompute),
            (Some(50_000), 40_000, true, None, Normal),
            (Some(10_000), 20_000, true, None, Critical),
            (Some(1_000), 1_000_000, true, None, Critical),
        ];
        for (balance, burn, funded, zero, expected) in cases {
            let inputs = TierInputs {
                balance_sats: balance,
                daily_burn_sats: burn,
                ever_funded: funded,
                zero_since: zero.map(|s| at(-s)),
                now: at(0),
            };
            assert_eq!(compute_tier(&inputs, &t), expected, "{inputs:?}");
        }
    }

    #[test]
    fn multipliers_and_card_words() {
        let m: Vec<f64> = SurvivalTier::ALL
            .iter()
            .map(|t| heartbeat_multiplier(*t))
            .collect();
        assert!(
            m.windows(2).all(|w| w[0] <= w[1]),
            "worse tiers never beat faster: {m:?}"
        );
        assert_eq!(heartbeat_multiplier(SurvivalTier::Normal), 1.0);
        let words: Vec<&str> = SurvivalTier::ALL.iter().map(|t| card_status(*t)).collect();
        assert_eq!(words, ["alive", "alive", "low", "critical", "dead"]);
        for t in SurvivalTier::ALL {
            assert_eq!(t.as_str().parse::<SurvivalTier>(), Ok(t));
            assert_eq!(serde_json::to_string(&t).unwrap(), format!("\"{t}\""));
        }
    }

    #[test]
    fn model_routing_falls_back_towards_the_default() {
        let mut c = InferenceConfig {
            model: "big".into(),
            ..InferenceConfig::default()
        };
        for t in SurvivalTier::ALL {
            assert_eq!(model_for_tier(&c, t), "big");
        }
        c.tier_models.low_compute = Some("small".into());
        assert_eq!(model_for_tier(&c, SurvivalTier::Normal), "big");
        assert_eq!(model_for_tier(&c, SurvivalTier::LowCompute), "small");
        assert_eq!(model_for_tier(&c, SurvivalTier::Critical), "small");
        assert_eq!(model_for_tier(&c, SurvivalTier::Dead), "small");
        c.tier_models.critical = Some("tiny".into());
        c.tier_models.high = Some("best".into());
        assert_eq!(model_for_tier(&c, SurvivalTier::Critical), "tiny");
        assert_eq!(model_for_tier(&c, SurvivalTier::Dead), "tiny");
        assert_eq!(model_for_tier(&c, SurvivalTier::High), "best");
    }

    fn wake_events(db: &Db) -> Vec<String> {
        db.call_blocking(|c| {
            let mut s =
                c.prepare("SELECT source || ': ' || reason FROM wake_events ORDER BY id")?;
            let rows = s.query_map([], |r| r.get(0))?;
            rows.collect()
        })
        .unwrap()
    }

    #[test]
    fn draining_and_funding_walks_the_tiers_with_distress_and_resurrection() {
        use SurvivalTier::*;
        let db = Db::open_in_memory().unwrap();
        let t = TierThresholds {
            dead_grace_secs: 60,
            ..TierThresholds::default()
        };
        let step = |balance: Option<u64>, secs: i64| {
            db.call_blocking(|c| Ok(update_tier_at(c, balance, &t, at(secs))))
                .unwrap()
                .unwrap()
        };
        assert_eq!(current_tier(&db), Normal, "unset reads as normal");
        // Never funded: critical, but no distress.
        let u = step(Some(0), 0);
        assert_eq!((u.tier, u.distress), (Critical, false));
        assert!(wake_events(&db).is_empty());
        let u = step(Some(30_000), 1);
        assert_eq!((u.tier, u.changed), (Normal, true));
        assert!(!step(Some(30_000), 2).changed, "idempotent");
        assert_eq!(step(Some(10_000), 3).tier, LowCompute);
        assert_eq!(
            step(None, 4).tier,
            Normal,
            "unknown balance counts as normal"
        );
        let u = step(Some(100), 5);
        assert_eq!((u.tier, u.distress), (Critical, true));
        let u = step(Some(0), 10);
        assert_eq!((u.tier, u.distress, u.changed), (Critical, false, false));
        assert_eq!(step(Some(0), 69).tier, Critical, "grace period not over");
        let u = step(Some(0), 70);
        assert_eq!((u.tier, u.distress), (Dead, true));
        assert_eq!(current_tier(&db), Dead);
        let u = step(Some(25_000), 80);
        assert_eq!((u.tier, u.resurrected), (Normal, true));
        let events = wake_events(&db);
        assert_eq!(events.len(), 3, "{events:?}");
        assert!(events[0].starts_with("wallet: distress: survival tier is now critical"));
        assert!(events[1].starts_with("wallet: distress: survival tier is now dead"));
        assert!(events[2].starts_with("wallet: resurrected"));
        // Zero again starts a fresh grace period.
        assert_eq!(step(Some(0), 100).tier, Critical);
        assert_eq!(step(Some(0), 150).tier, Critical);
        assert_eq!(step(Some(0), 160).tier, Dead);
    }

    #[test]
    fn burn_counts_settled_spend_and_priced_inference() {
        let db = Db::open_in_memory().unwrap();
        let now = at(0);
        db.call_blocking(move |c| {
            c.execute(
                "INSERT INTO money_permits (id, rail, amount_msat, max_fee_msat, reserved_msat, purpose, state, \
                 paid_msat, fee_msat, created_at) VALUES ('p', 'bolt11', 7000000, 0, 7000000, 'x', 'settled', \
                 7000000, 0, ?1)",
                [ts(now - chrono::Duration::days(3))],
            )?;
            c.execute(
                "INSERT INTO inference_calls (id, provider, model, cost_sats, duration_ms, created_at) \
                 VALUES ('i', 'openai', 'm', 300, 1, ?1)",
                [ts(now - chrono::Duration::hours(1))],
            )?;
            Ok(())
        })
        .unwrap();
        // Last 24 h: 300; 7-day average: (7000 + 300) / 7 → 1043.
        let burn = db.call_blocking(move |c| daily_burn_sats(c, now)).unwrap();
        assert_eq!(burn, 1043);
    }
}
