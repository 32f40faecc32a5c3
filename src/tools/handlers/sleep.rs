//! `sleep`: end the turn and rest until a time or a wake event.

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::tools::{Control, Risk, ToolContext, ToolDef, ToolError, ToolHandler, ToolOutput};

pub struct SleepTool;

#[derive(Deserialize)]
struct Args {
    seconds: u64,
    reason: Option<String>,
}

#[async_trait]
impl ToolHandler for SleepTool {
    fn def(&self) -> ToolDef {
        ToolDef {
            name: "sleep",
            description: "End this turn and sleep. You wake when the time is up or earlier when something happens \
                          (a scheduled task, a payment, a message). Sleep whenever there is nothing useful to do: \
                          thinking costs money.",
            parameters: json!({
                "type": "object",
                "properties": {
                    "seconds": {"type": "integer", "minimum": 1, "description": "How long to sleep."},
                    "reason": {"type": "string", "description": "Why, for your own log."}
                },
                "required": ["seconds"],
                "additionalProperties": false
            }),
            risk: Risk::Safe,
            read_only: true,
        }
    }

    async fn call(&self, ctx: &ToolContext, args: Value) -> Result<ToolOutput, ToolError> {
        let args: Args =
            serde_json::from_value(args).map_err(|e| ToolError::Respond(e.to_string()))?;
        let max = ctx.config.agent.max_sleep_secs.max(1);
        let seconds = args.seconds.clamp(1, max);
        let mut content = format!("sleeping for {seconds} s");
        if seconds < args.seconds {
            content.push_str(&format!(" (the longest sleep allowed is {max} s)"));
        }
        Ok(ToolOutput {
            content,
            is_error: false,
            control: Some(Control::Sleep {
                seconds,
                reason: args.reason.filter(|r| !r.trim().is_empty()),
            }),
        })
    }
}
