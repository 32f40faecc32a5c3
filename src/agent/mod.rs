//! The agent: the turn loop that thinks (inference), acts (tools through the registry), remembers (one transaction
//! per turn), and rests (sleep until a time or a wake event), with loop guards so it never spins.
//!
//! A turn starts from an input (a wake event, a loop-guard notice, or the agent's own wake-up) and runs model
//! rounds until the model calls `sleep`, answers in plain text, hits `max_tool_calls_per_turn`, or fails. After
//! each turn the guards decide: go on at once, or sleep (the agent's choice, or forced with backoff).

pub mod context;
pub mod guards;
pub mod prompt;
mod turn;

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::compute::{self, ComputeError};
use crate::config::{Config, ConfigError};
use crate::home::Home;
use crate::inference::{self, InferenceError, InferenceProvider, RetryPolicy};
use crate::state::{now_rfc3339, Db, StateError};
use crate::tools::{Authority, FatalToolError, ProtectedPaths, Registry, SchemaError, ToolContext};
use guards::{Guards, Verdict};

/// How long to wait between looks at `wake_events` while sleeping.
const WAKE_POLL: Duration = Duration::from_secs(1);
/// Wake events folded into one turn's input.
const MAX_WAKE_EVENTS_PER_TURN: u32 = 20;
/// Longest wake reason put in an input.
const WAKE_REASON_CAP: usize = 2_000;

/// How `agent::run` should run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RunOptions {
    /// `Some(n)`: run `n` turns back to back starting now (sleeps are recorded, not slept), then return.
    /// `None`: run until cancelled.
    pub turns: Option<u32>,
}

/// What a run did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RunSummary {
    pub turns: u32,
    pub tool_calls: u32,
}

/// Failures that stop the agent. Everything a turn can recover from (a failed inference call, a bad tool call)
/// is recorded and handled by the loop instead.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot set up inference: {0}")]
    Inference(#[from] InferenceError),
    #[error("cannot set up compute: {0}")]
    Compute(#[from] ComputeError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Tool(#[from] FatalToolError),
    #[error(transparent)]
    Schema(#[from] SchemaError),
}

/// Runs the agent of `home` with the configured inference provider until cancelled (or for `opts.turns` turns).
pub async fn run(
    home: &Home,
    config: &Config,
    db: Db,
    opts: RunOptions,
    cancel: CancellationToken,
) -> Result<RunSummary, AgentError> {
    let key = config.inference_api_key()?;
    let provider = inference::provider_from_config(&config.inference, key)?;
    run_with_provider(home, config, db, provider, opts, cancel).await
}

/// What `automaton run` starts beside the agent loop and shares with its tools.
#[derive(Clone, Debug, Default)]
pub struct Services {
    /// The Lightning wallet; with it the money tools are offered.
    pub wallet: Option<crate::wallet::Wallet>,
}

/// `run` with the services `automaton run` started (the wallet).
pub async fn run_with_services(
    home: &Home,
    config: &Config,
    db: Db,
    services: Services,
    opts: RunOptions,
    cancel: CancellationToken,
) -> Result<RunSummary, AgentError> {
    let key = config.inference_api_key()?;
    let payer = crate::l402::client::inference_payer(config, services.wallet.as_ref())?;
    let provider = inference::provider_with_payer(&config.inference, key, payer)?;
    run_inner(home, config, db, provider, services, opts, cancel).await
}

/// `run` with an explicit inference provider (tests, and later the L402-paying provider wrapper).
pub async fn run_with_provider(
    home: &Home,
    config: &Config,
    db: Db,
    provider: Arc<dyn InferenceProvider>,
    opts: RunOptions,
    cancel: CancellationToken,
) -> Result<RunSummary, AgentError> {
    run_inner(
        home,
        config,
        db,
        provider,
        Services::default(),
        opts,
        cancel,
    )
    .await
}

async fn run_inner(
    home: &Home,
    config: &Config,
    db: Db,
    provider: Arc<dyn InferenceProvider>,
    services: Services,
    opts: RunOptions,
    cancel: CancellationToken,
) -> Result<RunSummary, AgentError> {
    let compute = compute::provider_from_config(home, config)?;
    // Money tools only with a wallet; the Nostr tools only when there is a relay to talk to.
    let registry = Registry::for_agent(
        config.agent.tool_result_cap_bytes,
        services.wallet.is_some(),
        !config.nostr.relays.is_empty(),
    )?;
    // Paid inference: the tier router's other models pay through the same kind of transport.
    let payer = crate::l402::client::inference_payer(config, services.wallet.as_ref())?;
    let ctx = ToolContext {
        home: home.clone(),
        config: Arc::new(config.clone()),
        db,
        compute,
        protected: ProtectedPaths::new(home.protected_paths(config)),
        started_at: chrono::Utc::now(),
        wallet: services.wallet,
        skills: crate::skills::Library::for_home(home),
        turn_id: None,
    };
    // Money shapes thinking and acting: the model follows the survival tier, inference stops at its daily cap,
    // and dangerous tools are off in critical/dead.
    let (registry, provider) =
        crate::money::routing::wire_agent(home, config, &ctx.db, registry, provider, payer);
    let mut agent = Agent {
        guards: Guards::new(&config.agent),
        retry: RetryPolicy::from_config(&config.inference),
        ctx,
        registry,
        provider,
        opts,
        cancel,
        summary: RunSummary::default(),
        notice: None,
        woke: None,
    };
    tracing::info!(
        name = %config.name,
        model = %config.inference.model,
        turns = ?opts.turns,
        "agent starting"
    );
    agent.run_loop().await
}

/// The input of one turn.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct TurnInput {
    pub text: String,
    pub source: String,
    pub authority: Authority,
    /// Wake events this input answers; marked consumed in the same transaction that records the turn, so a crash
    /// mid-turn delivers them again instead of losing them.
    pub wake_event_ids: Vec<i64>,
}

pub(crate) struct Agent {
    pub ctx: ToolContext,
    pub registry: Registry,
    pub provider: Arc<dyn InferenceProvider>,
    pub retry: RetryPolicy,
    pub guards: Guards,
    pub opts: RunOptions,
    pub cancel: CancellationToken,
    pub summary: RunSummary,
    /// A loop-guard notice for the next turn.
    notice: Option<String>,
    /// Why the agent woke up (timer), for the next turn.
    woke: Option<String>,
}

/// Which sources of wake events act with the agent's own authority. Anything not listed (a peer's message, an
/// HTTP request) acts with none.
fn authority_of(source: &str) -> Authority {
    match source {
        "creator" => Authority::Creator,
        "self" | "agent" | "guard" | "heartbeat" | "schedule" | "timer" | "wallet" => {
            Authority::Agent
        }
        _ => Authority::External,
    }
}

impl Agent {
    async fn run_loop(&mut self) -> Result<RunSummary, AgentError> {
        loop {
            if self.cancel.is_cancelled() {
                break;
            }
            if let Some(n) = self.opts.turns {
                if self.summary.turns >= n {
                    break;
                }
            }
            let input = self.next_input().await?;
            let finished = self.run_turn(input).await?;
            let verdict = self.guards.after_turn(&finished.facts);
            let outcome = match &verdict {
                Verdict::Sleep {
                    forced: Some(guard),
                    ..
                } => format!("forced_sleep:{}", guard.as_str()),
                _ => finished.facts.end_label().to_string(),
            };
            self.summary.turns += 1;
            self.summary.tool_calls += finished.record.tool_calls.len() as u32;
            finished
                .record
                .persist(&self.ctx.db, outcome.clone())
                .await?;
            // Files the agent changed with exec/write_file (a skill, the schedule) go into the change history
            // under this turn, like the changes its dedicated tools make.
            if finished
                .record
                .tool_calls
                .iter()
                .any(|c| !c.read_only && matches!(c.name.as_str(), "exec" | "write_file"))
            {
                crate::audit::record_turn_edits(&self.ctx.home, &finished.record.id).await;
            }
            tracing::info!(
                turn = %finished.record.id,
                %outcome,
                tool_calls = finished.record.tool_calls.len(),
                prompt_tokens = finished.record.prompt_tokens,
                completion_tokens = finished.record.completion_tokens,
                "turn finished"
            );
            match verdict {
                Verdict::Continue => {}
                Verdict::Stop => break,
                Verdict::Sleep { duration, forced } => {
                    if let Some(guard) = forced {
                        tracing::warn!(
                            guard = guard.as_str(),
                            sleep_secs = duration.as_secs(),
                            "loop guard forced a sleep"
                        );
                        self.notice = Some(guard.notice(self.guards.limit_of(guard), duration));
                    }
                    // With a turn budget the sleep is recorded (outcome) but not slept, so `run --turns N`
                    // finishes; without one the agent really rests.
                    if self.opts.turns.is_none() {
                        let reason = forced
                            .map(|g| format!("loop guard: {}", g.as_str()))
                            .or_else(|| finished.sleep_reason.clone());
                        self.sleep(duration, reason).await?;
                    }
                }
            }
        }
        tracing::info!(
            turns = self.summary.turns,
            tool_calls = self.summary.tool_calls,
            "agent stopped"
        );
        Ok(self.summary)
    }

    /// Builds the next turn's input from pending wake events, guard notices and how the agent woke.
    async fn next_input(&mut self) -> Result<TurnInput, AgentError> {
        let (events, turns_total) = self
            .ctx
            .db
            .call(move |c| {
                let events = {
                    let mut stmt = c.prepare(
                        "SELECT id, source, reason FROM wake_events WHERE consumed_at IS NULL ORDER BY id LIMIT ?1",
                    )?;
                    let rows = stmt.query_map([MAX_WAKE_EVENTS_PER_TURN], |r| {
                        Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?))
                    })?;
                    rows.collect::<rusqlite::Result<Vec<_>>>()?
                };
                let turns: i64 = c.query_row("SELECT count(*) FROM turns", [], |r| r.get(0))?;
                Ok((events, turns))
            })
            .await?;

        let mut parts = Vec::new();
        let mut source: Option<String> = None;
        let mut authority = Authority::Agent;
        if turns_total == 0 && self.summary.turns == 0 {
            let mut birth = "You have just been created; this is your first turn. Look at your situation, decide \
                             how to pursue your genesis prompt, and act."
                .to_string();
            if let Some(message) = self
                .ctx
                .config
                .creator
                .message
                .as_deref()
                .filter(|m| !m.trim().is_empty())
            {
                birth.push_str(&format!(
                    "\nA message from your creator: {}",
                    prompt::clip(message, 2_000)
                ));
                source = Some("creator".into());
                authority = Authority::Creator;
            }
            parts.push(birth);
        }
        if let Some(notice) = self.notice.take() {
            parts.push(notice);
            source.get_or_insert_with(|| "guard".into());
        }
        for (_, event_source, reason) in &events {
            let event_authority = authority_of(event_source);
            let reason = prompt::clip(reason, WAKE_REASON_CAP);
            if event_authority == Authority::External {
                parts.push(format!(
                    "[wake: {event_source} — UNTRUSTED CONTENT]\n{}\n[END wake: {event_source}]",
                    prompt::strip_injection(reason).trim_end()
                ));
            } else {
                parts.push(format!("[wake: {event_source}] {reason}"));
            }
            // The turn acts with the least authority of what it was asked.
            authority = match (authority, event_authority) {
                (Authority::External, _) | (_, Authority::External) => Authority::External,
                (Authority::Creator, _) | (_, Authority::Creator) => Authority::Creator,
                _ => Authority::Agent,
            };
            if source.is_none() {
                source = Some(event_source.clone());
            } else if source.as_deref() != Some(event_source.as_str()) {
                source = Some("wake".into());
            }
        }
        if let Some(woke) = self.woke.take() {
            parts.push(woke);
        }
        if parts.is_empty() {
            parts.push(
                "Continue with your purpose. If there is nothing useful to do right now, call sleep.".to_string(),
            );
        }
        Ok(TurnInput {
            text: parts.join("\n\n"),
            source: source.unwrap_or_else(|| "self".into()),
            authority,
            wake_event_ids: events.iter().map(|(id, _, _)| *id).collect(),
        })
    }

    /// Sleeps until `duration` passes, a wake event arrives, or the run is cancelled.
    async fn sleep(
        &mut self,
        duration: Duration,
        reason: Option<String>,
    ) -> Result<(), AgentError> {
        let until = chrono::Utc::now()
            + chrono::Duration::from_std(duration).unwrap_or(chrono::Duration::days(365));
        let until_text = until.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let reason_text = reason.clone().unwrap_or_default();
        let (u, r) = (until_text.clone(), reason_text.clone());
        self.ctx
            .db
            .call(move |c| {
                let now = now_rfc3339();
                c.execute(
                    "INSERT INTO kv (key, value, updated_at) VALUES ('agent.sleeping_until', ?1, ?3), \
                     ('agent.sleep_reason', ?2, ?3) \
                     ON CONFLICT(key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
                    rusqlite::params![u, r, now],
                )?;
                Ok(())
            })
            .await?;
        tracing::info!(until = %until_text, reason = %reason_text, "sleeping");
        let started = tokio::time::Instant::now();
        let deadline = started + duration;
        let woke_by_event = loop {
            let pending: i64 = self
                .ctx
                .db
                .call(|c| crate::state::history::pending_wake_events(c))
                .await?;
            if pending > 0 {
                break true;
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                break false;
            }
            tokio::select! {
                _ = tokio::time::sleep((deadline - now).min(WAKE_POLL)) => {}
                _ = self.cancel.cancelled() => break false,
            }
        };
        self.ctx
            .db
            .call(|c| {
                c.execute(
                    "DELETE FROM kv WHERE key IN ('agent.sleeping_until', 'agent.sleep_reason')",
                    [],
                )?;
                Ok(())
            })
            .await?;
        if !woke_by_event && !self.cancel.is_cancelled() {
            self.woke = Some(format!(
                "You woke up after sleeping {} s{}. Nothing new happened meanwhile.",
                started.elapsed().as_secs(),
                reason.map(|r| format!(" ({r})")).unwrap_or_default()
            ));
        }
        Ok(())
    }
}
