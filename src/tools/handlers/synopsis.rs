//! `system_synopsis`: the agent's view of itself — identity, uptime, history counters, spend, compute.

use async_trait::async_trait;
use serde_json::{json, Value};

use crate::state::history;
use crate::tools::{Risk, ToolContext, ToolDef, ToolError, ToolHandler, ToolOutput};

pub struct SystemSynopsisTool;

#[async_trait]
impl ToolHandler for SystemSynopsisTool {
    fn def(&self) -> ToolDef {
        ToolDef {
            name: "system_synopsis",
            description: "Report your own state: name, uptime, turns and tool calls so far, inference tokens and \
                          spend, the last turns' outcomes, pending wake events, compute and model.",
            parameters: json!({"type": "object", "properties": {}, "additionalProperties": false}),
            risk: Risk::Safe,
            read_only: true,
        }
    }

    async fn call(&self, ctx: &ToolContext, _args: Value) -> Result<ToolOutput, ToolError> {
        let (totals, recent, pending) = ctx
            .db
            .call(|c| {
                Ok((
                    history::totals(c)?,
                    history::recent_turns(c, 5)?,
                    history::pending_wake_events(c)?,
                ))
            })
            .await?;
        let now = chrono::Utc::now();
        let config = &ctx.config;
        let synopsis = json!({
            "name": config.name,
            "now": now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            "uptime_secs": (now - ctx.started_at).num_seconds().max(0),
            "turns": totals.turns,
            "tool_calls": totals.tool_calls,
            "inference": {
                "provider": config.inference.provider.as_str(),
                "model": config.inference.model,
                "calls": totals.inference_calls,
                "failed_calls": totals.inference_errors,
                "prompt_tokens": totals.prompt_tokens,
                "completion_tokens": totals.completion_tokens,
                "cost_sats": totals.inference_cost_sats,
                "priced": config.inference.price.is_some(),
            },
            "recent_turns": recent.iter().rev().map(|t| json!({
                "started_at": t.started_at,
                "source": t.input_source,
                "outcome": t.outcome,
                "tools": t.tool_calls.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "pending_wake_events": pending,
            "compute": {
                "provider": ctx.compute.kind(),
                "workdir": ctx.compute.workdir().display().to_string(),
            },
            "limits": {
                "per_payment_sats": config.limits.per_payment_sats,
                "hourly_sats": config.limits.hourly_sats,
                "daily_sats": config.limits.daily_sats,
                "reserve_sats": config.limits.reserve_sats,
            },
        });
        let text = serde_json::to_string_pretty(&synopsis)
            .map_err(|e| ToolError::Fatal(format!("synopsis: {e}")))?;
        Ok(ToolOutput::ok(text))
    }
}
