//! Heartbeat tasks of the Nostr presence: `publish_card` (republish the agent card on the schedule in
//! heartbeat.yaml) and `nostr_flush` (send whatever waits in the outbox). Both use a short-lived relay client
//! and bounded waits, so a relay that is down fails the run quickly and leaves the event queued.

use async_trait::async_trait;
use serde_json::{Map, Value};

use super::outbox::Purpose;
use super::presence::{publish_now, signed_card};
use super::relays::RelaySet;
use super::NostrError;
use crate::config::Config;
use crate::heartbeat::{HeartbeatTask, TaskContext, TaskError, TaskReport};

fn failed(e: impl std::fmt::Display) -> TaskError {
    TaskError::Failed(e.to_string())
}

fn load(ctx: &TaskContext) -> Result<(Config, RelaySet, ::nostr::Keys), TaskError> {
    let config = Config::load(&ctx.home).map_err(failed)?;
    let relays = RelaySet::from_config(&config).map_err(failed)?;
    relays.require().map_err(failed)?;
    let keys = super::agent_keys(&ctx.home).map_err(failed)?;
    Ok((config, relays, keys))
}

/// Republishes the agent card.
pub struct PublishCard;

#[async_trait]
impl HeartbeatTask for PublishCard {
    fn name(&self) -> &'static str {
        "publish_card"
    }

    fn description(&self) -> &'static str {
        "republish the agent's Nostr card (NIP-89) with its current status, services and Lightning address"
    }

    async fn run(
        &self,
        ctx: &TaskContext,
        _params: &Map<String, Value>,
    ) -> Result<TaskReport, TaskError> {
        let (config, relays, keys) = load(ctx)?;
        let (content, event) = signed_card(&ctx.db, &keys, &config).await.map_err(failed)?;
        match publish_now(&ctx.db, &keys, &relays, &event, Purpose::Card).await {
            Ok(published) => Ok(TaskReport {
                summary: format!(
                    "card {} ({}) accepted by {}",
                    published.event_id,
                    content.status,
                    published.accepted.join(", ")
                ),
                wake: None,
            }),
            Err(e @ NostrError::NotAccepted { .. }) => Err(TaskError::Failed(format!(
                "card {} stays queued: {e}",
                event.id
            ))),
            Err(e) => Err(failed(e)),
        }
    }
}

/// Sends what waits in the outbox.
pub struct FlushOutbox;

#[async_trait]
impl HeartbeatTask for FlushOutbox {
    fn name(&self) -> &'static str {
        "nostr_flush"
    }

    fn description(&self) -> &'static str {
        "send Nostr events still waiting in the outbox (cards, distress notes, messages) to relays that are back"
    }

    async fn run(
        &self,
        ctx: &TaskContext,
        _params: &Map<String, Value>,
    ) -> Result<TaskReport, TaskError> {
        let (_config, relays, keys) = load(ctx)?;
        let report = super::presence::flush_now(&ctx.db, &keys, &relays)
            .await
            .map_err(failed)?;
        Ok(TaskReport {
            summary: format!(
                "{} sent, {} failed, {} waiting for their relay",
                report.sent, report.failed, report.waiting
            ),
            wake: None,
        })
    }
}
