//! The scheduler's rows in the state DB: one plan row per entry (with its lease) and one history row per run.
//!
//! Timestamps are RFC 3339 UTC with milliseconds, so SQLite compares them correctly as text. Claiming a run is a
//! single conditional UPDATE: whichever scheduler's UPDATE changes the row owns the run; the other sees zero
//! rows changed and moves on.

use chrono::{DateTime, Utc};
use rusqlite::{params, Connection, OptionalExtension};

use super::timestamp;

/// An entry's plan row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlanRow {
    pub name: String,
    pub spec: String,
    pub last_run_at: Option<String>,
    pub next_run_at: Option<String>,
    pub lease_owner: Option<String>,
    pub lease_until: Option<String>,
}

pub fn plan_rows(conn: &Connection) -> rusqlite::Result<Vec<PlanRow>> {
    let mut stmt = conn.prepare(
        "SELECT name, spec, last_run_at, next_run_at, lease_owner, lease_until FROM heartbeat_schedule",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(PlanRow {
            name: r.get(0)?,
            spec: r.get(1)?,
            last_run_at: r.get(2)?,
            next_run_at: r.get(3)?,
            lease_owner: r.get(4)?,
            lease_until: r.get(5)?,
        })
    })?;
    rows.collect()
}

/// What the scheduler wants a row to say (computed from the file, the tier and the row's last run).
pub struct Planned {
    pub name: String,
    pub spec: String,
    pub next_run_at: Option<DateTime<Utc>>,
}

/// Writes plans for new or changed entries and drops rows of entries that left the file. Rows whose spec is
/// unchanged keep their next run: that is what makes a restart resume the schedule instead of restarting it.
pub fn apply_plans(
    conn: &mut Connection,
    planned: &[Planned],
    now: DateTime<Utc>,
) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let now = timestamp(now);
    for plan in planned {
        tx.execute(
            "INSERT INTO heartbeat_schedule (name, spec, next_run_at, updated_at) VALUES (?1, ?2, ?3, ?4) \
             ON CONFLICT(name) DO UPDATE SET spec = excluded.spec, next_run_at = excluded.next_run_at, \
             updated_at = excluded.updated_at WHERE heartbeat_schedule.spec != excluded.spec",
            params![plan.name, plan.spec, plan.next_run_at.map(timestamp), now],
        )?;
    }
    let keep: Vec<&str> = planned.iter().map(|p| p.name.as_str()).collect();
    let mut stmt = tx.prepare("SELECT name FROM heartbeat_schedule")?;
    let existing: Vec<String> = stmt
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    drop(stmt);
    for name in existing {
        if !keep.contains(&name.as_str()) {
            // A run in progress keeps its row until it finishes; the next sync removes it.
            tx.execute(
                "DELETE FROM heartbeat_schedule WHERE name = ?1 AND (lease_until IS NULL OR lease_until <= ?2)",
                params![name, now],
            )?;
        }
    }
    tx.commit()
}

/// Claims `name` for one run: only when no live lease is held and (unless `force`) the run is due.
/// Returns the run's `scheduled_for` time when this caller won.
pub fn try_claim(
    conn: &Connection,
    name: &str,
    owner: &str,
    now: DateTime<Utc>,
    lease_until: DateTime<Utc>,
    force: bool,
) -> rusqlite::Result<Option<Option<String>>> {
    let now = timestamp(now);
    let changed = conn.execute(
        "UPDATE heartbeat_schedule SET lease_owner = ?2, lease_until = ?3, updated_at = ?4 \
         WHERE name = ?1 AND (lease_until IS NULL OR lease_until <= ?4) \
         AND (?5 OR (next_run_at IS NOT NULL AND next_run_at <= ?4))",
        params![name, owner, timestamp(lease_until), now, force],
    )?;
    if changed == 0 {
        return Ok(None);
    }
    let scheduled: Option<String> = conn
        .query_row(
            "SELECT next_run_at FROM heartbeat_schedule WHERE name = ?1",
            [name],
            |r| r.get(0),
        )
        .optional()?
        .flatten();
    Ok(Some(scheduled))
}

/// Records the start of a run.
pub fn start_run(
    conn: &Connection,
    id: &str,
    entry: &str,
    task: &str,
    owner: &str,
    started_at: DateTime<Utc>,
    scheduled_for: Option<&str>,
) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO heartbeat_runs (id, task, started_at, entry, owner, scheduled_for) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![id, task, timestamp(started_at), entry, owner, scheduled_for],
    )?;
    Ok(())
}

/// How a run ended, as stored in `heartbeat_runs.outcome`.
pub struct Finish<'a> {
    pub run_id: &'a str,
    pub entry: &'a str,
    pub owner: &'a str,
    pub started_at: DateTime<Utc>,
    pub ended_at: DateTime<Utc>,
    pub outcome: &'a str,
    pub summary: Option<&'a str>,
    pub error: Option<&'a str>,
    /// The planned next run (None: the entry is disabled or gone).
    pub next_run_at: Option<DateTime<Utc>>,
    /// Wake the agent with this reason.
    pub wake: Option<&'a str>,
}

/// Ends a run: history row, next plan, lease released and the wake event, all in one transaction, so a crash
/// leaves either the whole run recorded or a lease that expires and lets the run happen again.
pub fn finish_run(conn: &mut Connection, f: &Finish<'_>) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let ended = timestamp(f.ended_at);
    tx.execute(
        "UPDATE heartbeat_runs SET ended_at = ?2, outcome = ?3, summary = ?4, error = ?5 WHERE id = ?1",
        params![f.run_id, ended, f.outcome, f.summary, f.error],
    )?;
    tx.execute(
        "UPDATE heartbeat_schedule SET last_run_at = ?3, next_run_at = ?4, lease_owner = NULL, \
         lease_until = NULL, updated_at = ?5 WHERE name = ?1 AND lease_owner = ?2",
        params![
            f.entry,
            f.owner,
            timestamp(f.started_at),
            f.next_run_at.map(timestamp),
            ended
        ],
    )?;
    if let Some(reason) = f.wake {
        tx.execute(
            "INSERT INTO wake_events (source, reason, created_at) VALUES ('heartbeat', ?1, ?2)",
            params![format!("{}: {reason}", f.entry), ended],
        )?;
    }
    tx.commit()
}

/// One run from the history.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct RunRow {
    pub id: String,
    pub entry: Option<String>,
    pub task: String,
    pub started_at: String,
    pub ended_at: Option<String>,
    pub outcome: Option<String>,
    pub summary: Option<String>,
    pub error: Option<String>,
}

/// The last run of each entry.
pub fn last_runs(conn: &Connection) -> rusqlite::Result<Vec<RunRow>> {
    let mut stmt = conn.prepare(
        "SELECT id, entry, task, started_at, ended_at, outcome, summary, error FROM heartbeat_runs r \
         WHERE rowid = (SELECT max(rowid) FROM heartbeat_runs WHERE entry = r.entry)",
    )?;
    let rows = stmt.query_map([], run_from_row)?;
    rows.collect()
}

/// Runs, oldest first (optionally of one entry).
pub fn runs(conn: &Connection, entry: Option<&str>) -> rusqlite::Result<Vec<RunRow>> {
    let mut stmt = conn.prepare(
        "SELECT id, entry, task, started_at, ended_at, outcome, summary, error FROM heartbeat_runs \
         WHERE ?1 IS NULL OR entry = ?1 ORDER BY rowid",
    )?;
    let rows = stmt.query_map([entry], run_from_row)?;
    rows.collect()
}

fn run_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RunRow> {
    Ok(RunRow {
        id: r.get(0)?,
        entry: r.get(1)?,
        task: r.get(2)?,
        started_at: r.get(3)?,
        ended_at: r.get(4)?,
        outcome: r.get(5)?,
        summary: r.get(6)?,
        error: r.get(7)?,
    })
}
