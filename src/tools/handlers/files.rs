//! `read_file` and `write_file`: files on the compute provider, never the home's protected files.

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::{json, Value};

use super::target_path;
use crate::tools::{Risk, ToolContext, ToolDef, ToolError, ToolHandler, ToolOutput};

/// Largest file the agent may write in one call.
pub const MAX_WRITE_BYTES: usize = 1024 * 1024;

pub struct ReadFileTool;

pub struct WriteFileTool;

#[derive(Deserialize)]
struct ReadArgs {
    path: String,
}

#[derive(Deserialize)]
struct WriteArgs {
    path: String,
    content: String,
}

#[async_trait]
impl ToolHandler for ReadFileTool {
    fn def(&self) -> ToolDef {
        ToolDef {
            name: "read_file",
            description: "Read a text file on your compute. Relative paths start in your workspace directory. \
                          Long files are cut; the wallet, state database, config and constitution are off limits.",
            parameters: json!({
                "type": "object",
                "properties": {
                    "path": {"type": "string", "minLength": 1, "description": "Absolute, or relative to the workspace."}
                },
                "required": ["path"],
                "additionalProperties": false
            }),
            risk: Risk::Safe,
            read_only: true,
        }
    }

    async fn call(&self, ctx: &ToolContext, args: Value) -> Result<ToolOutput, ToolError> {
        let args: ReadArgs =
            serde_json::from_value(args).map_err(|e| ToolError::Respond(e.to_string()))?;
        let path = target_path(ctx, &args.path)?;
        // Leave room for the note below, so the registry's result cap never cuts it off.
        let cap = ctx
            .config
            .agent
            .tool_result_cap_bytes
            .saturating_sub(300)
            .max(1);
        let file = ctx.compute.read_file(&path, cap).await?;
        if file.bytes.contains(&0) {
            return Ok(ToolOutput::ok(format!(
                "{} is a binary file of {} bytes; use exec (e.g. `file`, `xxd | head`) to inspect it",
                path.display(),
                file.size
            )));
        }
        let mut text = String::from_utf8_lossy(&file.bytes).into_owned();
        if file.size > file.bytes.len() as u64 {
            text.push_str(&format!(
                "\n[file is {} bytes; only the first {} are shown — use exec with `sed -n` or `tail` for the rest]",
                file.size,
                file.bytes.len()
            ));
        }
        Ok(ToolOutput::ok(text))
    }
}

#[async_trait]
impl ToolHandler for WriteFileTool {
    fn def(&self) -> ToolDef {
        ToolDef {
            name: "write_file",
            description: "Create or overwrite a file on your compute (parent directories are created). Relative \
                          paths start in your workspace directory. The wallet, state database, config and \
                          constitution are off limits.",
            parameters: json!({
                "type": "object",
                "properties": {
                    "path": {"type": "string", "minLength": 1, "description": "Absolute, or relative to the workspace."},
                    "content": {"type": "string", "description": "The whole new content of the file."}
                },
                "required": ["path", "content"],
                "additionalProperties": false
            }),
            risk: Risk::Caution,
            read_only: false,
        }
    }

    async fn call(&self, ctx: &ToolContext, args: Value) -> Result<ToolOutput, ToolError> {
        let args: WriteArgs =
            serde_json::from_value(args).map_err(|e| ToolError::Respond(e.to_string()))?;
        if args.content.len() > MAX_WRITE_BYTES {
            return Err(ToolError::Respond(format!(
                "content is {} bytes; write at most {MAX_WRITE_BYTES} bytes per call",
                args.content.len()
            )));
        }
        let path = target_path(ctx, &args.path)?;
        ctx.compute
            .write_file(&path, args.content.as_bytes())
            .await?;
        Ok(ToolOutput::ok(format!(
            "wrote {} bytes to {}",
            args.content.len(),
            path.display()
        )))
    }
}
