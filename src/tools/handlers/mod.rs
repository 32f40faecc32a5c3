//! The built-in tool handlers of the runtime: `exec`, `read_file`, `write_file`, `sleep`, `system_synopsis`.

mod exec;
mod files;
pub mod l402;
pub mod nostr;
pub mod replication;
pub mod schedule;
mod sleep;
mod synopsis;
pub mod vps;
pub mod wallet;

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use exec::ExecTool;
pub use files::{ReadFileTool, WriteFileTool};
pub use sleep::SleepTool;
pub use synopsis::SystemSynopsisTool;

use super::{ToolContext, ToolError, ToolHandler};

/// Every built-in tool, in the order they are offered to the model.
pub fn builtin() -> Vec<Arc<dyn ToolHandler>> {
    vec![
        Arc::new(ExecTool),
        Arc::new(ReadFileTool),
        Arc::new(WriteFileTool),
        Arc::new(SleepTool),
        Arc::new(SystemSynopsisTool),
        Arc::new(schedule::ModifyHeartbeatTool),
        Arc::new(schedule::ListSkillsTool),
        Arc::new(schedule::CreateSkillTool),
        Arc::new(schedule::RemoveSkillTool),
        Arc::new(schedule::UpdateGenesisPromptTool),
    ]
}

/// A JSON value as a tool's (pretty-printed) result.
pub(crate) fn json_output(value: serde_json::Value) -> Result<super::ToolOutput, ToolError> {
    serde_json::to_string_pretty(&value)
        .map(super::ToolOutput::ok)
        .map_err(|e| ToolError::Fatal(e.to_string()))
}

/// Turns a model-supplied path into the absolute path to act on: relative paths start at the compute provider's
/// working directory; on the agent's own machine the home's protected paths are refused after resolving every
/// symlink and `..`.
pub(crate) fn target_path(ctx: &ToolContext, raw: &str) -> Result<PathBuf, ToolError> {
    if raw.trim().is_empty() {
        return Err(ToolError::Respond("path is empty".into()));
    }
    if raw.contains('\0') {
        return Err(ToolError::Respond("path contains a NUL byte".into()));
    }
    let raw = Path::new(raw);
    let absolute = if raw.is_absolute() {
        raw.to_path_buf()
    } else {
        ctx.compute.workdir().join(raw)
    };
    if ctx.compute.shares_agent_filesystem() {
        Ok(ctx.protected.check(&absolute)?)
    } else {
        Ok(absolute)
    }
}
