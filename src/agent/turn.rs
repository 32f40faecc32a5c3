//! One turn: model rounds and tool calls until the turn ends, then everything it did written in one transaction.

use std::time::Duration;

use rusqlite::params;
use tracing::Instrument;

use super::context::{self, estimate_tokens, message_tokens, History};
use super::guards::{TurnEnd, TurnFacts};
use super::prompt::{self, Status};
use super::{Agent, AgentError, TurnInput};
use crate::inference::{self, complete_with_retry, ChatRequest, InferenceError, Message, Usage};
use crate::state::{history, new_id, now_rfc3339, Db, StateError};
use crate::tools::{Control, ToolResult};

/// One tool call as it will be stored.
#[derive(Clone, Debug)]
pub(crate) struct ToolCallRow {
    pub id: String,
    pub name: String,
    pub arguments: String,
    pub result: String,
    pub is_error: bool,
    pub duration: Duration,
    pub created_at: String,
    pub read_only: bool,
}

/// One inference call as it will be stored.
#[derive(Clone, Debug)]
pub(crate) struct InferenceRow {
    pub id: String,
    pub model: String,
    pub usage: Usage,
    pub cost_sats: Option<i64>,
    pub duration: Duration,
    pub attempts: u32,
    pub error: Option<String>,
    pub created_at: String,
}

/// Everything a turn did, kept in memory until the turn ends and then written at once.
#[derive(Clone, Debug)]
pub(crate) struct TurnRecord {
    pub id: String,
    pub started_at: String,
    pub input: String,
    pub input_source: String,
    pub thinking: Vec<String>,
    pub tool_calls: Vec<ToolCallRow>,
    pub inference_calls: Vec<InferenceRow>,
    pub provider: String,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub cost_sats: Option<i64>,
    pub wake_event_ids: Vec<i64>,
}

pub(crate) struct FinishedTurn {
    pub record: TurnRecord,
    pub facts: TurnFacts,
    pub sleep_reason: Option<String>,
}

impl TurnRecord {
    /// Writes the turn, its tool calls and its inference calls, and marks the wake events it answered as consumed,
    /// in one transaction.
    pub async fn persist(&self, db: &Db, outcome: String) -> Result<(), StateError> {
        let turn = self.clone();
        db.call(move |c| {
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let thinking = Some(turn.thinking.join("\n\n")).filter(|t| !t.trim().is_empty());
            tx.execute(
                "INSERT INTO turns (id, started_at, ended_at, input, input_source, thinking, outcome, \
                 prompt_tokens, completion_tokens, cost_sats) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                params![
                    turn.id,
                    turn.started_at,
                    now_rfc3339(),
                    turn.input,
                    turn.input_source,
                    thinking,
                    outcome,
                    turn.prompt_tokens,
                    turn.completion_tokens,
                    turn.cost_sats
                ],
            )?;
            for (seq, call) in turn.tool_calls.iter().enumerate() {
                tx.execute(
                    "INSERT INTO tool_calls (id, turn_id, seq, name, arguments, result, is_error, duration_ms, \
                     created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                    params![
                        call.id,
                        turn.id,
                        seq as i64,
                        call.name,
                        call.arguments,
                        call.result,
                        call.is_error,
                        call.duration.as_millis() as i64,
                        call.created_at
                    ],
                )?;
            }
            for call in &turn.inference_calls {
                tx.execute(
                    "INSERT INTO inference_calls (id, turn_id, provider, model, prompt_tokens, completion_tokens, \
                     cost_sats, duration_ms, attempts, error, created_at) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
                    params![
                        call.id,
                        turn.id,
                        turn.provider,
                        call.model,
                        call.usage.prompt_tokens,
                        call.usage.completion_tokens,
                        call.cost_sats,
                        call.duration.as_millis() as i64,
                        call.attempts,
                        call.error,
                        call.created_at
                    ],
                )?;
            }
            for id in &turn.wake_event_ids {
                tx.execute(
                    "UPDATE wake_events SET consumed_at = ?1 WHERE id = ?2 AND consumed_at IS NULL",
                    params![turn.started_at, id],
                )?;
            }
            tx.commit()
        })
        .await
    }
}

/// `name(arguments)` with the arguments in canonical JSON, so key order and spacing do not hide a repeat.
fn pattern_entry(name: &str, arguments: &str) -> String {
    let args = serde_json::from_str::<serde_json::Value>(arguments)
        .map(|v| v.to_string())
        .unwrap_or_else(|_| arguments.trim().to_string());
    format!("{name}({args})")
}

impl Agent {
    async fn status(&self) -> Result<Status, StateError> {
        let (totals, last, pending) = self
            .ctx
            .db
            .call(|c| {
                Ok((
                    history::totals(c)?,
                    history::last_turn(c)?,
                    history::pending_wake_events(c)?,
                ))
            })
            .await?;
        let now = chrono::Utc::now();
        Ok(Status {
            now: now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            uptime_secs: (now - self.ctx.started_at).num_seconds().max(0),
            turns_total: totals.turns,
            turns_this_run: self.summary.turns,
            inference_cost_sats: totals.inference_cost_sats,
            inference_tokens: totals.prompt_tokens + totals.completion_tokens,
            last_outcome: last.map(|t| format!("{} ({})", t.outcome, t.started_at)),
            pending_wake_events: pending,
        })
    }

    pub(super) async fn run_turn(&mut self, input: TurnInput) -> Result<FinishedTurn, AgentError> {
        let turn_id = new_id();
        let span = tracing::info_span!("turn", id = %turn_id, source = %input.source);
        self.run_turn_inner(turn_id, input).instrument(span).await
    }

    async fn run_turn_inner(
        &mut self,
        turn_id: String,
        input: TurnInput,
    ) -> Result<FinishedTurn, AgentError> {
        let config = self.ctx.config.clone();
        self.ctx.turn_id = Some(turn_id.clone());
        let mut record = TurnRecord {
            id: turn_id,
            started_at: now_rfc3339(),
            input: input.text.clone(),
            input_source: input.source.clone(),
            thinking: Vec::new(),
            tool_calls: Vec::new(),
            inference_calls: Vec::new(),
            provider: config.inference.provider.as_str().to_string(),
            prompt_tokens: 0,
            completion_tokens: 0,
            cost_sats: config.inference.price.map(|_| 0),
            wake_event_ids: input.wake_event_ids.clone(),
        };

        let status = self.status().await?;
        let defs = self.registry.defs();
        let system = prompt::system_prompt(
            &self.ctx.home,
            &config,
            self.ctx.compute.kind(),
            self.ctx.compute.workdir(),
            &defs,
            &status,
            &self.ctx.skills,
        );
        let tools = self.registry.specs();
        let mut turn_messages = vec![Message::User {
            content: input.text.clone(),
        }];

        // Room for history: the budget minus the system prompt, the tool schemas, the answer, and what this turn
        // may add (every allowed tool call with a full-size result).
        let agent = &config.agent;
        let tools_tokens = estimate_tokens(&serde_json::to_string(&tools).unwrap_or_default());
        let turn_reserve = agent.max_tool_calls_per_turn as usize
            * (agent.tool_result_cap_bytes.div_ceil(4) + 100)
            + message_tokens(&turn_messages[0]);
        let history_budget = (agent.context_token_budget as usize)
            .saturating_sub(estimate_tokens(&system))
            .saturating_sub(tools_tokens)
            .saturating_sub(config.inference.max_tokens as usize)
            .saturating_sub(turn_reserve);
        let (recent, cap) = (agent.recent_turns, agent.tool_result_cap_bytes);
        let mut history: History = self
            .ctx
            .db
            .call(move |c| context::load_history(c, recent, history_budget, cap))
            .await?;

        let max_calls = agent.max_tool_calls_per_turn.max(1) as usize;
        let mut end: Option<TurnEnd> = None;
        let mut sleep_reason = None;
        let mut failed_inference = false;
        while end.is_none() {
            let mut messages = history.messages.clone();
            messages.extend(turn_messages.iter().cloned());
            let request = ChatRequest {
                system: system.clone(),
                messages,
                tools: tools.clone(),
                max_tokens: config.inference.max_tokens,
            };
            let call =
                complete_with_retry(self.provider.as_ref(), &request, &self.retry, &self.cancel)
                    .await;
            let created_at = now_rfc3339();
            let usage = call.result.as_ref().map(|c| c.usage).unwrap_or_default();
            let cost = inference::cost_sats(config.inference.price.as_ref(), usage);
            record.prompt_tokens += i64::from(usage.prompt_tokens);
            record.completion_tokens += i64::from(usage.completion_tokens);
            if let (Some(total), Some(c)) = (record.cost_sats.as_mut(), cost) {
                *total += c;
            }
            record.inference_calls.push(InferenceRow {
                id: new_id(),
                model: call
                    .result
                    .as_ref()
                    .ok()
                    .map(|c| c.model.clone())
                    .filter(|m| !m.is_empty())
                    .unwrap_or_else(|| config.inference.model.clone()),
                usage,
                cost_sats: cost,
                duration: call.duration,
                attempts: call.attempts,
                error: call
                    .result
                    .as_ref()
                    .err()
                    .map(|e| format!("{}: {e}", e.kind())),
                created_at,
            });
            let completion = match call.result {
                Ok(c) => c,
                Err(InferenceError::Cancelled) => {
                    end = Some(TurnEnd::Cancelled);
                    continue;
                }
                Err(InferenceError::ContextTooLong { message }) if !history.messages.is_empty() => {
                    tracing::warn!(%message, "context too long; retrying this round without history");
                    history = History::default();
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, attempts = call.attempts, "inference failed; ending the turn");
                    failed_inference = true;
                    end = Some(TurnEnd::Error);
                    continue;
                }
            };
            if let Some(text) = &completion.text {
                record.thinking.push(text.clone());
            }
            if completion.tool_calls.is_empty() {
                end = Some(TurnEnd::Text);
                continue;
            }
            turn_messages.push(Message::Assistant {
                content: completion.text.clone(),
                tool_calls: completion.tool_calls.clone(),
            });
            for call in &completion.tool_calls {
                if record.tool_calls.len() >= max_calls {
                    end = Some(TurnEnd::ToolLimit);
                    break;
                }
                let created_at = now_rfc3339();
                let result: ToolResult = tokio::select! {
                    r = self.registry.dispatch(&self.ctx, call, input.authority) => r?,
                    _ = self.cancel.cancelled() => {
                        // Dropping the dispatch kills what it started (the command's whole process group).
                        end = Some(TurnEnd::Cancelled);
                        ToolResult {
                            content: "Error: the agent was stopped while this tool ran".into(),
                            is_error: true,
                            duration: Duration::ZERO,
                            control: None,
                            read_only: true,
                        }
                    }
                };
                record.tool_calls.push(ToolCallRow {
                    id: new_id(),
                    name: call.name.clone(),
                    arguments: call.arguments.clone(),
                    result: result.content.clone(),
                    is_error: result.is_error,
                    duration: result.duration,
                    created_at,
                    read_only: result.read_only,
                });
                turn_messages.push(Message::Tool {
                    tool_call_id: call.id.clone(),
                    name: call.name.clone(),
                    content: result.content,
                    is_error: result.is_error,
                });
                if end.is_some() {
                    break;
                }
                if let Some(Control::Sleep { seconds, reason }) = result.control {
                    sleep_reason = reason;
                    end = Some(TurnEnd::Sleep { seconds });
                    break;
                }
            }
            if end.is_none() && record.tool_calls.len() >= max_calls {
                end = Some(TurnEnd::ToolLimit);
            }
        }
        let end = end.unwrap_or(TurnEnd::Error);

        let acting: Vec<&ToolCallRow> = record
            .tool_calls
            .iter()
            .filter(|c| c.name != "sleep")
            .collect();
        let mut pattern: Vec<String> = acting
            .iter()
            .map(|c| pattern_entry(&c.name, &c.arguments))
            .collect();
        pattern.sort();
        let facts = TurnFacts {
            maintenance_only: !acting.is_empty() && acting.iter().all(|c| c.read_only),
            failed: failed_inference || (!acting.is_empty() && acting.iter().all(|c| c.is_error)),
            pattern,
            end,
        };
        Ok(FinishedTurn {
            record,
            facts,
            sleep_reason,
        })
    }
}
