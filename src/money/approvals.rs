//! Creator approvals: a payment above `limits.approval_above_sats` waits here as `pending` until the creator
//! approves or denies it (`automaton approvals`); an approved request is then authorized exactly once.
//!
//! Approvals are plain DB rows, so the creator can decide while the agent is stopped; the running agent sees the
//! decision the next time it asks for the same payment (same rail, amounts, counterparty and purpose).

use std::time::Duration;

use chrono::{DateTime, Utc};
use rusqlite::{params, Connection, OptionalExtension, Row};
use serde::Serialize;

use super::{ts, BudgetError, MoneyError, Rail, SpendRequest};
use crate::state::{new_id, Db};

/// How long a request waits for the creator before it lapses.
pub const PENDING_TTL: chrono::Duration = chrono::Duration::hours(24);
/// How long an approval stays usable after the creator gave it.
pub const APPROVED_TTL: chrono::Duration = chrono::Duration::hours(24);
/// How long a denial answers the same request again (instead of asking the creator anew).
pub const DENIAL_MEMORY: chrono::Duration = chrono::Duration::hours(24);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ApprovalStatus {
    Pending,
    Approved,
    Denied,
    /// Approved and spent by one permit.
    Used,
    /// Nobody decided in time, or the approval was not used in time.
    Expired,
}

impl ApprovalStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ApprovalStatus::Pending => "pending",
            ApprovalStatus::Approved => "approved",
            ApprovalStatus::Denied => "denied",
            ApprovalStatus::Used => "used",
            ApprovalStatus::Expired => "expired",
        }
    }

    fn parse(s: &str) -> ApprovalStatus {
        match s {
            "approved" => ApprovalStatus::Approved,
            "denied" => ApprovalStatus::Denied,
            "used" => ApprovalStatus::Used,
            "expired" => ApprovalStatus::Expired,
            _ => ApprovalStatus::Pending,
        }
    }
}

impl std::fmt::Display for ApprovalStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One request for the creator's approval.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Approval {
    pub id: String,
    pub status: ApprovalStatus,
    pub rail: Rail,
    pub amount_msat: u64,
    pub max_fee_msat: u64,
    pub purpose: String,
    pub counterparty: Option<String>,
    pub created_at: String,
    pub expires_at: String,
    pub decided_at: Option<String>,
    pub note: Option<String>,
    pub used_at: Option<String>,
    pub permit_id: Option<String>,
}

const COLUMNS: &str =
    "id, status, rail, amount_msat, max_fee_msat, purpose, counterparty, created_at, expires_at, \
                       decided_at, note, used_at, permit_id";

fn from_row(r: &Row<'_>) -> rusqlite::Result<Approval> {
    let rail: String = r.get(2)?;
    Ok(Approval {
        id: r.get(0)?,
        status: ApprovalStatus::parse(&r.get::<_, String>(1)?),
        rail: rail.parse().unwrap_or(Rail::Bolt11),
        amount_msat: r.get::<_, i64>(3)?.max(0) as u64,
        max_fee_msat: r.get::<_, i64>(4)?.max(0) as u64,
        purpose: r.get(5)?,
        counterparty: r.get(6)?,
        created_at: r.get(7)?,
        expires_at: r.get(8)?,
        decided_at: r.get(9)?,
        note: r.get(10)?,
        used_at: r.get(11)?,
        permit_id: r.get(12)?,
    })
}

/// Pending requests and unused approvals past their time lapse.
fn expire(conn: &Connection, now: DateTime<Utc>) -> rusqlite::Result<()> {
    conn.execute(
        "UPDATE money_approvals SET status = 'expired' WHERE status IN ('pending', 'approved') AND expires_at <= ?1",
        [ts(now)],
    )?;
    Ok(())
}

/// What the approval step of `authorize` decided.
pub(crate) enum Gate {
    /// Go ahead, using this approval.
    Approved(String),
    /// Waiting for the creator, or denied by them.
    Refused(BudgetError),
}

/// The approval step inside the gate's transaction.
pub(crate) fn gate(
    conn: &Connection,
    req: &SpendRequest,
    threshold_sats: u64,
    now: DateTime<Utc>,
) -> rusqlite::Result<Gate> {
    expire(conn, now)?;
    let fingerprint = req.fingerprint();
    let find = |status: &str,
                since: Option<String>|
     -> rusqlite::Result<Option<(String, Option<String>)>> {
        conn.query_row(
            "SELECT id, note FROM money_approvals WHERE fingerprint = ?1 AND status = ?2 \
             AND (?3 IS NULL OR decided_at >= ?3) ORDER BY created_at LIMIT 1",
            params![fingerprint, status, since],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()
    };
    if let Some((id, _)) = find("approved", None)? {
        return Ok(Gate::Approved(id));
    }
    let waiting = |approval_id: String| {
        Gate::Refused(BudgetError::NeedsApproval {
            approval_id,
            threshold_sats,
            requested_msat: req.total_msat(),
        })
    };
    if let Some((id, _)) = find("pending", None)? {
        return Ok(waiting(id));
    }
    if let Some((id, note)) = find("denied", Some(ts(now - DENIAL_MEMORY)))? {
        return Ok(Gate::Refused(BudgetError::Denied {
            reason: format!(
                "the creator denied this payment (approval {id}{})",
                note.map(|n| format!(": {n}")).unwrap_or_default()
            ),
        }));
    }
    let id = new_id();
    conn.execute(
        "INSERT INTO money_approvals (id, fingerprint, rail, amount_msat, max_fee_msat, purpose, counterparty, \
         status, created_at, expires_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'pending', ?8, ?9)",
        params![
            id,
            fingerprint,
            req.rail.as_str(),
            req.amount_msat as i64,
            req.max_fee_msat as i64,
            req.purpose,
            req.counterparty,
            ts(now),
            ts(now + PENDING_TTL),
        ],
    )?;
    tracing::info!(approval = %id, amount_msat = req.amount_msat, "payment waits for the creator's approval");
    Ok(waiting(id))
}

/// Spends an approval on a permit (in the gate's transaction): it can never authorize a second payment.
pub(crate) fn mark_used(
    conn: &Connection,
    id: &str,
    permit_id: &str,
    now: DateTime<Utc>,
) -> rusqlite::Result<()> {
    conn.execute(
        "UPDATE money_approvals SET status = 'used', used_at = ?2, permit_id = ?3 WHERE id = ?1 AND status = 'approved'",
        params![id, ts(now), permit_id],
    )?;
    Ok(())
}

/// Approval requests, newest first: only those waiting for a decision, or all of them.
pub fn list(db: &Db, all: bool) -> Result<Vec<Approval>, MoneyError> {
    Ok(db.call_blocking(move |conn| {
        expire(conn, Utc::now())?;
        let filter = if all { "" } else { "WHERE status = 'pending'" };
        let mut stmt = conn.prepare(&format!(
            "SELECT {COLUMNS} FROM money_approvals {filter} ORDER BY created_at DESC, id DESC"
        ))?;
        let rows = stmt.query_map([], from_row)?;
        rows.collect()
    })?)
}

/// One approval request by id or by a unique prefix of it (case-insensitive).
pub fn get(db: &Db, id_or_prefix: &str) -> Result<Approval, MoneyError> {
    let key = id_or_prefix.trim().to_ascii_uppercase();
    if key.is_empty() {
        return Err(MoneyError::UnknownApproval(id_or_prefix.to_string()));
    }
    let found = db.call_blocking(move |conn| {
        expire(conn, Utc::now())?;
        let mut stmt = conn.prepare(&format!(
            "SELECT {COLUMNS} FROM money_approvals WHERE substr(id, 1, length(?1)) = ?1 ORDER BY id LIMIT 10"
        ))?;
        let rows = stmt.query_map([&key], from_row)?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
    })?;
    match found.len() {
        0 => Err(MoneyError::UnknownApproval(id_or_prefix.to_string())),
        1 => Ok(found.into_iter().next().expect("one element")),
        _ => match found
            .iter()
            .find(|a| a.id == id_or_prefix.trim().to_ascii_uppercase())
        {
            Some(exact) => Ok(exact.clone()),
            None => Err(MoneyError::AmbiguousApproval {
                prefix: id_or_prefix.to_string(),
                ids: found.into_iter().map(|a| a.id).collect(),
            }),
        },
    }
}

/// The creator approves a pending request; the agent's next identical request goes through (once).
pub fn approve(db: &Db, id_or_prefix: &str, note: Option<&str>) -> Result<Approval, MoneyError> {
    decide(db, id_or_prefix, ApprovalStatus::Approved, note)
}

/// The creator denies a pending request; the same request is refused for a day.
pub fn deny(db: &Db, id_or_prefix: &str, note: Option<&str>) -> Result<Approval, MoneyError> {
    decide(db, id_or_prefix, ApprovalStatus::Denied, note)
}

fn decide(
    db: &Db,
    id_or_prefix: &str,
    status: ApprovalStatus,
    note: Option<&str>,
) -> Result<Approval, MoneyError> {
    let approval = get(db, id_or_prefix)?;
    let id = approval.id.clone();
    let note = note
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(str::to_string);
    let now = Utc::now();
    let changed = db.call_blocking({
        let id = id.clone();
        move |conn| {
            conn.execute(
                "UPDATE money_approvals SET status = ?2, decided_at = ?3, note = ?4, \
                 expires_at = CASE WHEN ?2 = 'approved' THEN ?5 ELSE expires_at END \
                 WHERE id = ?1 AND status = 'pending'",
                params![id, status.as_str(), ts(now), note, ts(now + APPROVED_TTL)],
            )
        }
    })?;
    if changed == 0 {
        let current = get(db, &id)?;
        return Err(MoneyError::ApprovalNotPending {
            id,
            status: current.status.to_string(),
        });
    }
    tracing::info!(approval = %id, status = status.as_str(), "creator decided on a payment");
    get(db, &id)
}

/// Waits (polling with backoff) until the creator decides on `id` or `timeout` passes; returns the approval as it
/// then is. For `wallet pay`, which blocks until an approval-gated payment can go through.
pub async fn wait_for_decision(
    db: &Db,
    id: &str,
    timeout: Duration,
) -> Result<Approval, MoneyError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut pause = Duration::from_millis(100);
    loop {
        let (db2, id2) = (db.clone(), id.to_string());
        let approval = tokio::task::spawn_blocking(move || get(&db2, &id2))
            .await
            .map_err(|e| MoneyError::State(crate::state::StateError::Join(e.to_string())))??;
        let now = tokio::time::Instant::now();
        if approval.status != ApprovalStatus::Pending || now >= deadline {
            return Ok(approval);
        }
        tokio::time::sleep(pause.min(deadline - now)).await;
        pause = (pause * 2).min(Duration::from_secs(2));
    }
}
