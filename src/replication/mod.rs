//! Replication: an agent that can afford it spawns a child on another machine (a VPS it rents at LNVPS, a host it
//! reaches over SSH, a Conway sandbox, or another home on this machine), funds it over Lightning and watches it
//! live or die.
//!
//! - `mod.rs` (this file): the lifecycle states and the `children` table they are kept in.
//! - `spawn.rs`: the steps from `requested` to `funded`, each resumable.
//! - `site.rs`: where a child lives (a compute provider and a directory) and how its binary is driven there.
//! - `health.rs`: the heartbeat's view of each child (alive, unhealthy, dead), stopping and pruning.
//! - `messages.rs`: private messages between parent and child over Nostr.
//! - `topup.rs`: a child paying its own VM's rent through the VM's LNURL-pay endpoint.
//! - `tasks.rs`: the heartbeat tasks `child_health`, `family_inbox` and `topup_vm`.

pub mod health;
pub mod messages;
pub mod site;
pub mod spawn;
pub mod tasks;
pub mod topup;

use std::fmt;

use rusqlite::{params, OptionalExtension};
use serde::Serialize;

use crate::state::{now_rfc3339, Db, StateError};

/// Purpose of the payment that funds a child (on its receipt).
pub const FUND_PURPOSE: &str = "replication.fund";

/// Where a child is in its life. Spawn steps go down the list in order; `failed` can follow any of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ChildState {
    Requested,
    Provisioned,
    Installed,
    Configured,
    Started,
    Funded,
    Alive,
    Unhealthy,
    Dead,
    CleanedUp,
    Failed,
}

impl ChildState {
    pub const ALL: [ChildState; 11] = [
        ChildState::Requested,
        ChildState::Provisioned,
        ChildState::Installed,
        ChildState::Configured,
        ChildState::Started,
        ChildState::Funded,
        ChildState::Alive,
        ChildState::Unhealthy,
        ChildState::Dead,
        ChildState::CleanedUp,
        ChildState::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ChildState::Requested => "requested",
            ChildState::Provisioned => "provisioned",
            ChildState::Installed => "installed",
            ChildState::Configured => "configured",
            ChildState::Started => "started",
            ChildState::Funded => "funded",
            ChildState::Alive => "alive",
            ChildState::Unhealthy => "unhealthy",
            ChildState::Dead => "dead",
            ChildState::CleanedUp => "cleaned_up",
            ChildState::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<ChildState> {
        ChildState::ALL.into_iter().find(|c| c.as_str() == s)
    }

    /// A spawn that has not reached `funded` yet: resumed on the next start.
    pub fn is_spawning(self) -> bool {
        self < ChildState::Funded
    }

    /// Counts against `max_children`.
    pub fn counts(self) -> bool {
        !matches!(
            self,
            ChildState::Dead | ChildState::CleanedUp | ChildState::Failed
        )
    }

    /// Whether `self → next` is a transition the lifecycle allows.
    pub fn may_become(self, next: ChildState) -> bool {
        use ChildState::*;
        match (self, next) {
            (CleanedUp, _) => false,
            (_, CleanedUp) => matches!(self, Dead | Failed),
            (_, Failed) => self != Failed,
            (Alive | Funded, Unhealthy) | (Unhealthy, Alive) => true,
            (Alive | Unhealthy | Funded, Dead) => true,
            (Funded, Alive) => true,
            (Dead, Alive) => true,
            (a, b) => (b as u8) == (a as u8) + 1 && b <= Funded,
        }
    }
}

impl fmt::Display for ChildState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One child, as the parent remembers it.
#[derive(Clone, Debug, Serialize)]
pub struct Child {
    pub name: String,
    pub state: ChildState,
    pub provider: String,
    pub specialization: String,
    #[serde(skip)]
    pub genesis: String,
    pub fund_sats: u64,
    pub template: Option<String>,
    /// For an SSH child: the machine as configured when it was spawned (JSON).
    pub target: Option<String>,
    pub vm_id: Option<u64>,
    pub base_dir: Option<String>,
    pub http_url: Option<String>,
    pub node_id: Option<String>,
    pub npub: Option<String>,
    pub balance_sats: Option<u64>,
    pub card_status: Option<String>,
    #[serde(skip)]
    pub fund_invoice: Option<String>,
    pub fund_payment_hash: Option<String>,
    pub funded_sats: Option<u64>,
    pub last_seen_at: Option<String>,
    pub last_error: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

/// One recorded state change.
#[derive(Clone, Debug, Serialize)]
pub struct Transition {
    pub from: Option<String>,
    pub to: String,
    pub detail: Option<String>,
    pub at: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    /// A rule said no (max_children, tier, name taken, funding too small): exit code 2.
    #[error("{0}")]
    Refused(String),
    #[error("no child named {0:?} (see `automaton children`)")]
    NoSuchChild(String),
    #[error("{0}")]
    Failed(String),
    /// The funding payment was attempted and failed: exit code 3.
    #[error("{0}")]
    PaymentFailed(String),
    #[error(transparent)]
    State(#[from] StateError),
}

impl From<crate::compute::ComputeError> for ReplicationError {
    fn from(e: crate::compute::ComputeError) -> Self {
        ReplicationError::Failed(e.to_string())
    }
}

const COLUMNS: &str = "name, state, provider, specialization, genesis, fund_sats, template, vm_id, base_dir, \
                       http_url, node_id, npub, balance_sats, card_status, fund_invoice, fund_payment_hash, \
                       funded_sats, last_seen_at, last_error, created_at, updated_at, target";

fn row_to_child(r: &rusqlite::Row<'_>) -> rusqlite::Result<Child> {
    let state: String = r.get(1)?;
    let u = |v: Option<i64>| v.map(|n| n.max(0) as u64);
    Ok(Child {
        name: r.get(0)?,
        state: ChildState::parse(&state).unwrap_or(ChildState::Failed),
        provider: r.get(2)?,
        specialization: r.get(3)?,
        genesis: r.get(4)?,
        fund_sats: r.get::<_, i64>(5)?.max(0) as u64,
        template: r.get(6)?,
        vm_id: u(r.get(7)?),
        base_dir: r.get(8)?,
        http_url: r.get(9)?,
        node_id: r.get(10)?,
        npub: r.get(11)?,
        balance_sats: u(r.get(12)?),
        card_status: r.get(13)?,
        fund_invoice: r.get(14)?,
        fund_payment_hash: r.get(15)?,
        funded_sats: u(r.get(16)?),
        last_seen_at: r.get(17)?,
        last_error: r.get(18)?,
        created_at: r.get(19)?,
        updated_at: r.get(20)?,
        target: r.get(21)?,
    })
}

/// Every child ever spawned (pruned ones excepted), oldest first.
pub async fn list(db: &Db) -> Result<Vec<Child>, StateError> {
    db.call(|c| {
        let mut stmt = c.prepare(&format!(
            "SELECT {COLUMNS} FROM children ORDER BY created_at, name"
        ))?;
        let rows = stmt.query_map([], row_to_child)?;
        rows.collect()
    })
    .await
}

pub async fn get(db: &Db, name: &str) -> Result<Option<Child>, StateError> {
    let name = name.to_string();
    db.call(move |c| {
        c.query_row(
            &format!("SELECT {COLUMNS} FROM children WHERE name = ?1"),
            [name],
            row_to_child,
        )
        .optional()
    })
    .await
}

/// The child named `name`, or a clear error.
pub async fn require(db: &Db, name: &str) -> Result<Child, ReplicationError> {
    get(db, name)
        .await?
        .ok_or_else(|| ReplicationError::NoSuchChild(name.to_string()))
}

/// Every state change of one child, oldest first.
pub async fn transitions(db: &Db, name: &str) -> Result<Vec<Transition>, StateError> {
    let name = name.to_string();
    db.call(move |c| {
        let mut stmt = c.prepare(
            "SELECT from_state, to_state, detail, at FROM child_transitions WHERE child = ?1 ORDER BY id",
        )?;
        let rows = stmt.query_map([name], |r| {
            Ok(Transition {
                from: r.get(0)?,
                to: r.get(1)?,
                detail: r.get(2)?,
                at: r.get(3)?,
            })
        })?;
        rows.collect()
    })
    .await
}

/// Moves a child to `next` and records the change (a no-op when it is already there). Refuses a transition the
/// lifecycle does not allow.
pub async fn transition(
    db: &Db,
    name: &str,
    next: ChildState,
    detail: Option<String>,
) -> Result<(), ReplicationError> {
    let name = name.to_string();
    let done = db
        .call(move |c| {
            let tx = rusqlite::Transaction::new_unchecked(c, rusqlite::TransactionBehavior::Immediate)?;
            let current: Option<String> = tx
                .query_row("SELECT state FROM children WHERE name = ?1", [&name], |r| {
                    r.get(0)
                })
                .optional()?;
            let Some(current) = current else {
                return Ok(Err(ReplicationError::NoSuchChild(name)));
            };
            let from = ChildState::parse(&current).unwrap_or(ChildState::Failed);
            if from == next {
                return Ok(Ok(()));
            }
            if !from.may_become(next) {
                return Ok(Err(ReplicationError::Failed(format!(
                    "child {name} cannot go from {from} to {next}"
                ))));
            }
            let now = now_rfc3339();
            let error = if next == ChildState::Failed {
                detail.clone()
            } else {
                None
            };
            tx.execute(
                "UPDATE children SET state = ?2, updated_at = ?3, last_error = COALESCE(?4, last_error) \
                 WHERE name = ?1",
                params![name, next.as_str(), now, error],
            )?;
            tx.execute(
                "INSERT INTO child_transitions (child, from_state, to_state, detail, at) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![name, from.as_str(), next.as_str(), detail, now],
            )?;
            tx.commit()?;
            tracing::info!(child = %name, from = %from, to = %next, "child state");
            Ok(Ok(()))
        })
        .await?;
    done
}

/// Sets one column of a child's row (only the columns spawn and health steps own).
pub(crate) async fn set(
    db: &Db,
    name: &str,
    column: &'static str,
    value: rusqlite::types::Value,
) -> Result<(), StateError> {
    debug_assert!(matches!(
        column,
        "attempts"
            | "vm_id"
            | "base_dir"
            | "http_url"
            | "node_id"
            | "npub"
            | "balance_sats"
            | "card_status"
            | "fund_invoice"
            | "fund_payment_hash"
            | "funded_sats"
            | "last_seen_at"
            | "last_error"
    ));
    let name = name.to_string();
    db.call(move |c| {
        c.execute(
            &format!("UPDATE children SET {column} = ?2, updated_at = ?3 WHERE name = ?1"),
            params![name, value, now_rfc3339()],
        )
    })
    .await
    .map(|_| ())
}

/// Takes the lease on a spawn for this process: refused while another live process holds it. A lease held by a
/// dead process (a killed `automaton spawn`, a crashed agent) is taken over. Dropping the returned lease (even
/// when a timeout drops the spawn's future) frees it within this process.
pub(crate) async fn take_lease(db: &Db, name: &str) -> Result<Lease, ReplicationError> {
    // Within this process: one driver per child (the spawn tool's task and the heartbeat share a pid).
    if !in_process()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(name.to_string())
    {
        return Err(ReplicationError::Refused(format!(
            "the spawn of {name} is already under way in this process (see `automaton child show {name}`)"
        )));
    }
    let lease = Lease {
        db: db.clone(),
        name: name.to_string(),
    };
    take_db_lease(db, name).await?;
    Ok(lease)
}

/// A spawn's lease, held while one worker drives it.
pub(crate) struct Lease {
    db: Db,
    name: String,
}

impl Lease {
    /// Frees the lease in the database too.
    pub(crate) async fn release(self) {
        let _ = release_lease(&self.db, &self.name).await;
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        in_process()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.name);
    }
}

fn in_process() -> &'static std::sync::Mutex<std::collections::HashSet<String>> {
    static DRIVING: std::sync::OnceLock<std::sync::Mutex<std::collections::HashSet<String>>> =
        std::sync::OnceLock::new();
    DRIVING.get_or_init(Default::default)
}

async fn take_db_lease(db: &Db, name: &str) -> Result<(), ReplicationError> {
    let name_shown = name.to_string();
    let name = name.to_string();
    let me = std::process::id() as i64;
    let holder = db
        .call(move |c| {
            let tx =
                rusqlite::Transaction::new_unchecked(c, rusqlite::TransactionBehavior::Immediate)?;
            let pid: Option<i64> = tx
                .query_row(
                    "SELECT worker_pid FROM children WHERE name = ?1",
                    [&name],
                    |r| r.get(0),
                )
                .optional()?
                .flatten();
            if let Some(pid) = pid.filter(|p| *p != me && process_alive(*p)) {
                return Ok(Some(pid));
            }
            tx.execute(
                "UPDATE children SET worker_pid = ?2, worker_until = ?3 WHERE name = ?1",
                params![name, me, now_rfc3339()],
            )?;
            tx.commit()?;
            Ok(None)
        })
        .await?;
    match holder {
        Some(pid) => Err(ReplicationError::Refused(format!(
            "process {pid} (an `automaton spawn` or the running agent) is working on the spawn of {name_shown} \
             right now; follow it with `automaton child show {name_shown}`"
        ))),
        None => Ok(()),
    }
}

async fn release_lease(db: &Db, name: &str) -> Result<(), StateError> {
    let name = name.to_string();
    let me = std::process::id() as i64;
    db.call(move |c| {
        c.execute(
            "UPDATE children SET worker_pid = NULL, worker_until = NULL WHERE name = ?1 AND worker_pid = ?2",
            params![name, me],
        )
    })
    .await
    .map(|_| ())
}

fn process_alive(pid: i64) -> bool {
    i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
        .is_some_and(|p| rustix::process::test_kill_process(p).is_ok())
}

/// Children that count against `max_children` (spawning or alive).
pub async fn living_count(db: &Db) -> Result<usize, StateError> {
    Ok(list(db)
        .await?
        .into_iter()
        .filter(|c| c.state.counts())
        .count())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spawn_steps_go_in_order_and_fail_from_anywhere() {
        use ChildState::*;
        assert!(Requested.may_become(Provisioned));
        assert!(!Requested.may_become(Installed));
        assert!(Started.may_become(Funded));
        assert!(Funded.may_become(Alive));
        assert!(Alive.may_become(Unhealthy) && Unhealthy.may_become(Alive));
        assert!(Unhealthy.may_become(Dead));
        assert!(!Dead.may_become(Unhealthy));
        assert!(Dead.may_become(CleanedUp) && Failed.may_become(CleanedUp));
        assert!(!Alive.may_become(CleanedUp));
        for s in ChildState::ALL {
            assert_eq!(ChildState::parse(s.as_str()), Some(s));
            if s != CleanedUp && s != Failed {
                assert!(s.may_become(Failed), "{s}");
            }
        }
        assert!(!CleanedUp.may_become(Failed));
        assert!(Provisioned.is_spawning() && !Funded.is_spawning());
        assert!(!Dead.counts() && Unhealthy.counts());
    }
}
