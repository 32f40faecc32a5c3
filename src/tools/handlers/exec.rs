//! `exec`: run a shell command on the compute provider, with a timeout and an output cap.

use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::compute::ExecRequest;
use crate::tools::{Risk, ToolContext, ToolDef, ToolError, ToolHandler, ToolOutput};

/// Longest timeout the model may ask for; anything longer should be a background job.
pub const MAX_TIMEOUT_SECS: u64 = 3600;

pub struct ExecTool;

#[derive(Deserialize)]
struct Args {
    command: String,
    timeout_secs: Option<u64>,
}

#[async_trait]
impl ToolHandler for ExecTool {
    fn def(&self) -> ToolDef {
        ToolDef {
            name: "exec",
            description: "Run a shell command (sh -c) on your compute, in your workspace directory. Returns the exit \
                          code, stdout and stderr (each cut to a size cap). The command and everything it starts \
                          are killed when the timeout passes. Secrets are not in its environment.",
            parameters: json!({
                "type": "object",
                "properties": {
                    "command": {"type": "string", "minLength": 1, "description": "The command line to run."},
                    "timeout_secs": {"type": "integer", "minimum": 1, "maximum": MAX_TIMEOUT_SECS,
                                     "description": "Seconds before the command is killed (default from config)."}
                },
                "required": ["command"],
                "additionalProperties": false
            }),
            risk: Risk::Caution,
            read_only: false,
        }
    }

    async fn call(&self, ctx: &ToolContext, args: Value) -> Result<ToolOutput, ToolError> {
        let args: Args =
            serde_json::from_value(args).map_err(|e| ToolError::Respond(e.to_string()))?;
        if ctx.compute.shares_agent_filesystem() {
            if let Some(path) = ctx.protected.mentioned_in(&args.command) {
                return Err(ToolError::Respond(format!(
                    "the command names {}, which is protected; it was not run",
                    path.display()
                )));
            }
        }
        // Both streams must fit in one tool result, or the registry's cap would cut stderr off entirely.
        let stream_cap = ctx
            .config
            .compute
            .output_cap_bytes
            .min(ctx.config.agent.tool_result_cap_bytes.saturating_sub(300) / 2)
            .max(256);
        let timeout_secs = args
            .timeout_secs
            .unwrap_or(ctx.config.compute.exec_timeout_secs)
            .clamp(1, MAX_TIMEOUT_SECS);
        let out = ctx
            .compute
            .exec(ExecRequest {
                command: args.command,
                timeout: Duration::from_secs(timeout_secs),
                output_cap: stream_cap,
            })
            .await?;
        let mut text = String::new();
        if out.timed_out {
            text.push_str(&format!(
                "timed out after {timeout_secs} s: the command and every process it started were killed\n"
            ));
        } else if let Some(code) = out.exit_code {
            text.push_str(&format!("exit code: {code}\n"));
        } else if let Some(signal) = out.signal {
            text.push_str(&format!("killed by signal {signal}\n"));
        }
        // A cut stream carries its own "[… N bytes cut …]" marker between its head and tail.
        for (label, body) in [("stdout", &out.stdout), ("stderr", &out.stderr)] {
            if body.is_empty() {
                continue;
            }
            text.push_str(&format!("--- {label} ---\n{body}"));
            if !body.ends_with('\n') {
                text.push('\n');
            }
        }
        Ok(ToolOutput {
            content: text,
            is_error: out.timed_out || out.exit_code != Some(0),
            control: None,
        })
    }
}
