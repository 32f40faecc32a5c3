//! The heartbeat: the agent's schedule. `heartbeat.yaml` lists entries (a cron expression or an interval, a
//! task, params, a timeout); the scheduler runs them while `automaton run` is up, reloads the file when it
//! changes (keeping the last good version when it is broken), stretches every interval by the survival tier's
//! multiplier, never runs one entry twice at once (a lease row in the state DB, so two schedulers sharing one DB
//! cannot either), runs a missed tick once instead of replaying it, stops a task at its timeout, keeps a history
//! row per run, and wakes the agent when a task says so.

pub mod clock;
mod edit;
mod scheduler;
pub mod spec;
pub mod store;
pub mod tasks;

use std::path::PathBuf;

use chrono::{DateTime, Utc};
use rusqlite::Connection;

pub use clock::{Clock, FakeClock, SystemClock};
pub use edit::{edit, Edit, EditOutcome};
pub use scheduler::{multiplier_for, plan, RunOutcome, RunRecord, Scheduler, TICK};
pub use spec::{Cadence, Entry, HeartbeatFile};
pub use tasks::{HeartbeatTask, TaskContext, TaskError, TaskRegistry, TaskReport};

use crate::money::tiers::{heartbeat_multiplier, tier_of, SurvivalTier};
use crate::state::StateError;

/// The kv key holding the survival tier (written by the money subsystem; `normal` when unset).
pub use crate::money::tiers::TIER_KEY;

#[derive(Debug, thiserror::Error)]
pub enum HeartbeatError {
    /// heartbeat.yaml does not parse or does not make sense.
    #[error("{}", describe_invalid(path, *line, key.as_deref(), message))]
    Invalid {
        path: PathBuf,
        line: Option<usize>,
        key: Option<String>,
        message: String,
    },
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write heartbeat.yaml: {0}")]
    Render(String),
    #[error("no heartbeat entry named {name:?} (entries: {known})")]
    NoSuchEntry { name: String, known: String },
    #[error(
        "a heartbeat entry named {name:?} already exists; remove it first or pick another name"
    )]
    EntryExists { name: String },
    #[error(
        "heartbeat entry {name:?} is running now (another run holds it); try again when it is done"
    )]
    Busy { name: String },
    #[error("{0}")]
    BadRequest(String),
    #[error(transparent)]
    State(#[from] StateError),
}

fn describe_invalid(
    path: &std::path::Path,
    line: Option<usize>,
    key: Option<&str>,
    message: &str,
) -> String {
    let mut out = path.display().to_string();
    if let Some(line) = line {
        out.push_str(&format!(":{line}"));
    }
    match key {
        Some(key) => out.push_str(&format!(": key `{key}`: {message}")),
        None => out.push_str(&format!(": {message}")),
    }
    out
}

/// A timestamp as every scheduler column stores it (fixed width, so text order is time order).
pub fn timestamp(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Parses a stored timestamp.
pub fn parse_timestamp(text: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// How much slower the schedule runs in a survival tier (`money::tiers::heartbeat_multiplier`): every interval
/// is multiplied by this. An unknown tier name counts as normal.
pub fn tier_multiplier(tier: &str) -> f64 {
    tier.parse::<SurvivalTier>()
        .map(heartbeat_multiplier)
        .unwrap_or(1.0)
}

/// The current survival tier's name (`normal` when the wallet has not said).
pub fn current_tier(conn: &Connection) -> rusqlite::Result<String> {
    Ok(tier_of(conn)?.as_str().to_string())
}
