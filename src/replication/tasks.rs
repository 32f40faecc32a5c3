//! Heartbeat tasks of the family: `child_health` (resume unfinished spawns, check each child, clean up failed
//! ones), `family_inbox` (private messages from the parent or children into the agent loop) and `topup_vm` (a
//! child paying for the VM it lives on). Each returns at once when there is nothing of its kind to do.

use async_trait::async_trait;
use serde_json::{Map, Value};

use crate::compute::lnvps::SocketPayer;
use crate::config::Config;
use crate::heartbeat::{HeartbeatTask, TaskContext, TaskError, TaskReport};

fn failed(e: impl std::fmt::Display) -> TaskError {
    TaskError::Failed(e.to_string())
}

/// Watches the children.
pub struct ChildHealth;

#[async_trait]
impl HeartbeatTask for ChildHealth {
    fn name(&self) -> &'static str {
        "child_health"
    }

    fn description(&self) -> &'static str {
        "resume unfinished spawns, check each child (alive, unhealthy after replication.unhealthy_after_secs of \
         silence, dead after dead_after_secs) and clean up failed ones"
    }

    async fn run(
        &self,
        ctx: &TaskContext,
        _params: &Map<String, Value>,
    ) -> Result<TaskReport, TaskError> {
        let before = super::list(&ctx.db).await?;
        if before.is_empty() {
            return Ok(TaskReport {
                summary: "no children".into(),
                wake: None,
            });
        }
        let config = Config::load(&ctx.home).map_err(failed)?;
        let payer = SocketPayer::new(&ctx.home);
        let lines = super::health::tick(&ctx.home, &config, &ctx.db, &payer)
            .await
            .map_err(failed)?;
        // A child that went unhealthy or dead since the last look is news for the agent.
        let after = super::list(&ctx.db).await?;
        let news: Vec<String> = after
            .iter()
            .filter(|c| {
                matches!(
                    c.state,
                    super::ChildState::Unhealthy | super::ChildState::Dead
                ) && before
                    .iter()
                    .any(|b| b.name == c.name && b.state != c.state)
            })
            .map(|c| format!("child {} is now {}", c.name, c.state))
            .collect();
        Ok(TaskReport {
            summary: lines.join("; "),
            wake: (!news.is_empty()).then(|| news.join("; ")),
        })
    }
}

/// Delivers private messages from the family.
pub struct FamilyInbox;

#[async_trait]
impl HeartbeatTask for FamilyInbox {
    fn name(&self) -> &'static str {
        "family_inbox"
    }

    fn description(&self) -> &'static str {
        "deliver private Nostr messages from this agent's parent or children into its loop (as untrusted input)"
    }

    fn stretches(&self) -> bool {
        false
    }

    async fn run(
        &self,
        ctx: &TaskContext,
        _params: &Map<String, Value>,
    ) -> Result<TaskReport, TaskError> {
        let config = Config::load(&ctx.home).map_err(failed)?;
        let n = super::messages::receive(&ctx.home, &config, &ctx.db)
            .await
            .map_err(failed)?;
        Ok(TaskReport {
            summary: format!("{n} new message(s) from the family"),
            wake: None,
        })
    }
}

/// A child pays for the VM it lives on.
pub struct TopupVm;

#[async_trait]
impl HeartbeatTask for TopupVm {
    fn name(&self) -> &'static str {
        "topup_vm"
    }

    fn description(&self) -> &'static str {
        "for a child on a rented VM: top it up through its LNURL-pay endpoint from this agent's own wallet when it \
         expires within replication.own_vm.lead_secs"
    }

    async fn run(
        &self,
        ctx: &TaskContext,
        _params: &Map<String, Value>,
    ) -> Result<TaskReport, TaskError> {
        let config = Config::load(&ctx.home).map_err(failed)?;
        let payer = SocketPayer::new(&ctx.home);
        let line = super::topup::topup_due(&config, &ctx.db, &payer)
            .await
            .map_err(failed)?;
        Ok(TaskReport {
            summary: line.unwrap_or_else(|| "no VM of my own to pay for".into()),
            wake: None,
        })
    }
}
