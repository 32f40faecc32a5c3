//! Heartbeat tasks: what an entry runs. The built-in ones (`status_refresh`, `wake_agent`) and the registry
//! later subsystems add theirs to (balance check, card publishing, VPS renewal, child health).

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use serde_json::{json, Map, Value};

use super::clock::Clock;
use crate::home::Home;
use crate::state::{history, Db, StateError};

/// Everything a task may use.
#[derive(Clone)]
pub struct TaskContext {
    pub home: Home,
    pub db: Db,
    pub clock: Arc<dyn Clock>,
    /// The heartbeat entry being run.
    pub entry: String,
}

/// What a run did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TaskReport {
    /// One line for the run history.
    pub summary: String,
    /// Wake the agent with this reason (it sees it as its next turn's input, from source `heartbeat`).
    pub wake: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error("{0}")]
    Failed(String),
    #[error(transparent)]
    State(#[from] StateError),
}

/// One kind of scheduled work.
#[async_trait]
pub trait HeartbeatTask: Send + Sync {
    fn name(&self) -> &'static str;
    fn description(&self) -> &'static str;
    /// Checks an entry's `params` when heartbeat.yaml is loaded, so mistakes show up then, not at 3 a.m.
    fn check_params(&self, params: &Map<String, Value>) -> Result<(), String> {
        match params.keys().next() {
            Some(key) => Err(format!("takes no params (got `{key}`)")),
            None => Ok(()),
        }
    }
    /// Whether a poorer survival tier stretches this task's interval. Tasks that watch for money arriving
    /// may say no, so a starving agent still notices when it is fed.
    fn stretches(&self) -> bool {
        true
    }
    async fn run(
        &self,
        ctx: &TaskContext,
        params: &Map<String, Value>,
    ) -> Result<TaskReport, TaskError>;
}

/// The tasks heartbeat entries may name.
#[derive(Clone, Default)]
pub struct TaskRegistry {
    tasks: BTreeMap<&'static str, Arc<dyn HeartbeatTask>>,
}

impl std::fmt::Debug for TaskRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.tasks.keys()).finish()
    }
}

impl TaskRegistry {
    /// The built-in tasks.
    pub fn builtin() -> TaskRegistry {
        let mut registry = TaskRegistry::default();
        registry.register(Arc::new(StatusRefresh));
        registry.register(Arc::new(WakeAgent));
        registry.register(Arc::new(crate::nostr::tasks::PublishCard));
        registry.register(Arc::new(crate::nostr::tasks::FlushOutbox));
        registry.register(Arc::new(RenewVps));
        registry.register(Arc::new(crate::replication::tasks::ChildHealth));
        registry.register(Arc::new(crate::replication::tasks::FamilyInbox));
        registry.register(Arc::new(crate::replication::tasks::TopupVm));
        registry
    }

    /// Adds (or replaces) a task.
    pub fn register(&mut self, task: Arc<dyn HeartbeatTask>) {
        self.tasks.insert(task.name(), task);
    }

    pub fn get(&self, name: &str) -> Option<&Arc<dyn HeartbeatTask>> {
        self.tasks.get(name)
    }

    pub fn names(&self) -> Vec<&'static str> {
        self.tasks.keys().copied().collect()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<dyn HeartbeatTask>> {
        self.tasks.values()
    }
}

/// Refreshes what the agent knows about itself and records it in `kv` (`status.snapshot`, `status.refreshed_at`);
/// wakes the agent when its survival tier changed since the last refresh.
pub struct StatusRefresh;

#[async_trait]
impl HeartbeatTask for StatusRefresh {
    fn name(&self) -> &'static str {
        "status_refresh"
    }

    fn description(&self) -> &'static str {
        "record the agent's status (tier, balance, turns, pending wake-ups); wake it when its tier changed"
    }

    async fn run(
        &self,
        ctx: &TaskContext,
        _params: &Map<String, Value>,
    ) -> Result<TaskReport, TaskError> {
        let now = super::timestamp(ctx.clock.now());
        let report = ctx
            .db
            .call(move |c| {
                let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
                let tier = history::kv_get(&tx, super::TIER_KEY)?.unwrap_or_else(|| "normal".into());
                let balance = history::kv_get(&tx, "money.balance_sats")?;
                let last_seen = history::kv_get(&tx, "status.tier_seen")?;
                let totals = history::totals(&tx)?;
                let pending = history::pending_wake_events(&tx)?;
                let sleeping_until = history::kv_get(&tx, "agent.sleeping_until")?;
                let snapshot = json!({
                    "at": now,
                    "tier": tier,
                    "balance_sats": balance.as_deref().and_then(|b| b.parse::<i64>().ok()),
                    "turns": totals.turns,
                    "inference_cost_sats": totals.inference_cost_sats,
                    "pending_wake_events": pending,
                    "sleeping_until": sleeping_until,
                });
                for (key, value) in [
                    ("status.snapshot", snapshot.to_string()),
                    ("status.refreshed_at", now.clone()),
                    ("status.tier_seen", tier.clone()),
                ] {
                    tx.execute(
                        "INSERT INTO kv (key, value, updated_at) VALUES (?1, ?2, ?3) \
                         ON CONFLICT(key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
                        rusqlite::params![key, value, now],
                    )?;
                }
                tx.commit()?;
                // The first refresh only learns the tier; a change after that is news worth waking for.
                let wake = match last_seen {
                    Some(before) if before != tier => Some(format!(
                        "your survival tier changed from {before} to {tier}{}",
                        balance
                            .map(|b| format!(" (balance {b} sats)"))
                            .unwrap_or_default()
                    )),
                    _ => None,
                };
                Ok(TaskReport {
                    summary: format!("tier {tier}, {} turns, {pending} wake-ups pending", totals.turns),
                    wake,
                })
            })
            .await?;
        Ok(report)
    }
}

/// Wakes the agent with `params.reason`, so it looks around on a schedule even when nothing happened.
pub struct WakeAgent;

#[async_trait]
impl HeartbeatTask for WakeAgent {
    fn name(&self) -> &'static str {
        "wake_agent"
    }

    fn description(&self) -> &'static str {
        "wake the agent with a reason (params.reason) it sees as its next input"
    }

    fn check_params(&self, params: &Map<String, Value>) -> Result<(), String> {
        for (key, value) in params {
            match key.as_str() {
                "reason" => match value.as_str() {
                    Some(r) if !r.trim().is_empty() && r.len() <= 2_000 => {}
                    Some(_) => return Err("`reason` must be 1-2000 characters".into()),
                    None => return Err("`reason` must be a string".into()),
                },
                other => return Err(format!("unknown param `{other}` (known: reason)")),
            }
        }
        Ok(())
    }

    async fn run(
        &self,
        ctx: &TaskContext,
        params: &Map<String, Value>,
    ) -> Result<TaskReport, TaskError> {
        let reason = params
            .get("reason")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| format!("scheduled wake-up ({})", ctx.entry));
        Ok(TaskReport {
            summary: "woke the agent".into(),
            wake: Some(reason),
        })
    }
}

/// Renews rented LNVPS VMs before they expire (`compute.lnvps.renew_lead_secs`), paying through the running
/// agent's budget gate; in `critical` or `dead` it lets them go instead.
pub struct RenewVps;

#[async_trait]
impl HeartbeatTask for RenewVps {
    fn name(&self) -> &'static str {
        "renew_vps"
    }

    fn description(&self) -> &'static str {
        "renew rented LNVPS VMs that expire within compute.lnvps.renew_lead_secs (let them go in critical/dead)"
    }

    async fn run(
        &self,
        ctx: &TaskContext,
        _params: &Map<String, Value>,
    ) -> Result<TaskReport, TaskError> {
        let config =
            crate::config::Config::load(&ctx.home).map_err(|e| TaskError::Failed(e.to_string()))?;
        let payer = crate::compute::lnvps::SocketPayer::new(&ctx.home);
        let lines = crate::compute::lnvps::renew_due(&ctx.home, &ctx.db, &config, &payer)
            .await
            .map_err(|e| TaskError::Failed(e.to_string()))?;
        let failed = lines.iter().any(|l| l.contains("not renewed"));
        let summary = if lines.is_empty() {
            "no VM is due for renewal".to_string()
        } else {
            lines.join("; ")
        };
        if failed {
            // A failed renewal is worth the agent's attention while there is still time before expiry.
            return Ok(TaskReport {
                wake: Some(format!("VPS renewal problem: {summary}")),
                summary,
            });
        }
        Ok(TaskReport {
            summary,
            wake: None,
        })
    }
}
