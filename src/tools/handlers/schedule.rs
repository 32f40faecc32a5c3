//! The agent changing itself: `modify_heartbeat` (its schedule), `list_skills`, `create_skill`, `remove_skill`
//! (its know-how) and `update_genesis_prompt` (its purpose). Every change is committed to the home's history
//! naming the tool and the turn; the running scheduler and the prompt pick changes up without a restart.

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::audit::{self, Actor};
use crate::heartbeat::{self, Edit, Entry, TaskRegistry};
use crate::tools::{Risk, ToolContext, ToolDef, ToolError, ToolHandler, ToolOutput};

/// Runs blocking work (files, git, flock) off the async executor.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ToolError> + Send + 'static,
) -> Result<T, ToolError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ToolError::Fatal(format!("tool task failed: {e}")))?
}

fn actor(ctx: &ToolContext, tool: &str) -> Actor {
    Actor::tool(tool, ctx.turn_id.as_deref())
}

fn recorded(change: &Option<String>, warning: &Option<String>) -> String {
    let mut out = match change {
        Some(id) => format!(
            " Recorded as change {} (your creator can see and revert it).",
            audit::short(id)
        ),
        None => String::new(),
    };
    if let Some(w) = warning {
        out.push_str(&format!(" Note: {w}."));
    }
    out
}

pub struct ModifyHeartbeatTool;

#[derive(Deserialize)]
struct HeartbeatArgs {
    action: String,
    name: String,
    schedule: Option<String>,
    every: Option<String>,
    task: Option<String>,
    params: Option<Map<String, Value>>,
    timeout: Option<String>,
}

#[async_trait]
impl ToolHandler for ModifyHeartbeatTool {
    fn def(&self) -> ToolDef {
        ToolDef {
            name: "modify_heartbeat",
            description: "Change your schedule (heartbeat.yaml): add an entry that runs a task on a cron schedule \
                          or at an interval, or remove, enable or disable one. Tasks: status_refresh (record your \
                          status; wakes you when your survival tier changes), wake_agent (wakes you with \
                          params.reason). Takes effect at once, without a restart.",
            parameters: json!({
                "type": "object",
                "properties": {
                    "action": {"type": "string", "enum": ["add", "remove", "enable", "disable"]},
                    "name": {"type": "string", "minLength": 1, "maxLength": 64, "description": "Entry name."},
                    "schedule": {"type": "string", "description": "For add: 5-field cron expression in UTC, e.g. \"0 */6 * * *\"."},
                    "every": {"type": "string", "description": "For add, instead of schedule: an interval like 30m, 6h, 1d."},
                    "task": {"type": "string", "description": "For add: status_refresh or wake_agent."},
                    "params": {"type": "object", "description": "For add: task parameters, e.g. {\"reason\": \"check the market\"} for wake_agent."},
                    "timeout": {"type": "string", "description": "For add: longest one run may take (default 30s)."}
                },
                "required": ["action", "name"],
                "additionalProperties": false
            }),
            risk: Risk::Caution,
            read_only: false,
        }
    }

    async fn call(&self, ctx: &ToolContext, args: Value) -> Result<ToolOutput, ToolError> {
        let args: HeartbeatArgs =
            serde_json::from_value(args).map_err(|e| ToolError::Respond(e.to_string()))?;
        let tasks = TaskRegistry::builtin();
        let edit = match args.action.as_str() {
            "add" => {
                let task = args.task.as_deref().ok_or_else(|| {
                    ToolError::Respond(format!(
                        "add needs `task` (one of: {})",
                        tasks.names().join(", ")
                    ))
                })?;
                let entry = Entry::build(
                    &tasks,
                    &args.name,
                    args.schedule.as_deref(),
                    args.every.as_deref(),
                    task,
                    args.params.unwrap_or_default(),
                    args.timeout.as_deref(),
                    true,
                )
                .map_err(ToolError::Respond)?;
                Edit::Add(Box::new(entry))
            }
            "remove" => Edit::Remove(args.name),
            "enable" => Edit::Enable(args.name),
            "disable" => Edit::Disable(args.name),
            other => return Err(ToolError::Respond(format!("unknown action {other:?}"))),
        };
        let (home, actor) = (ctx.home.clone(), actor(ctx, "modify_heartbeat"));
        let outcome = blocking(move || {
            heartbeat::edit(&home, &tasks, edit, &actor)
                .map_err(|e| ToolError::Respond(e.to_string()))
        })
        .await?;
        if outcome.unchanged {
            return Ok(ToolOutput::ok(format!(
                "{}: already so; nothing changed.",
                outcome.item
            )));
        }
        Ok(ToolOutput::ok(format!(
            "Done: {}. The scheduler applies it within a second.{}",
            outcome.item,
            recorded(&outcome.change, &outcome.warning)
        )))
    }
}

pub struct ListSkillsTool;

#[async_trait]
impl ToolHandler for ListSkillsTool {
    fn def(&self) -> ToolDef {
        ToolDef {
            name: "list_skills",
            description: "List your installed skills: whether each is active (in your prompt) and, if not, why \
                          (disabled, a missing program or environment variable, a broken SKILL.md).",
            parameters: json!({"type": "object", "properties": {}, "additionalProperties": false}),
            risk: Risk::Safe,
            read_only: true,
        }
    }

    async fn call(&self, ctx: &ToolContext, _args: Value) -> Result<ToolOutput, ToolError> {
        let library = ctx.skills.clone();
        let skills = blocking(move || Ok(library.skills())).await?;
        let listed: Vec<Value> = skills
            .iter()
            .map(|s| {
                json!({
                    "name": s.dir,
                    "active": s.active,
                    "reason": s.reason,
                    "description": s.description,
                    "path": s.path,
                })
            })
            .collect();
        Ok(ToolOutput::ok(
            serde_json::to_string_pretty(&listed).unwrap_or_else(|_| "[]".into()),
        ))
    }
}

pub struct CreateSkillTool;

#[derive(Deserialize)]
struct CreateArgs {
    name: String,
    description: String,
    instructions: String,
}

#[async_trait]
impl ToolHandler for CreateSkillTool {
    fn def(&self) -> ToolDef {
        ToolDef {
            name: "create_skill",
            description: "Write down know-how as a new skill (skills/<name>/SKILL.md) so future turns have it in \
                          their prompt. Use it for procedures that worked and that you will need again.",
            parameters: json!({
                "type": "object",
                "properties": {
                    "name": {"type": "string", "pattern": "^[a-z0-9][a-z0-9_-]{0,63}$", "description": "Folder name: lowercase, digits, - and _."},
                    "description": {"type": "string", "minLength": 1, "maxLength": 300, "description": "One line: what the skill is for."},
                    "instructions": {"type": "string", "minLength": 1, "maxLength": 16000, "description": "Markdown instructions."}
                },
                "required": ["name", "description", "instructions"],
                "additionalProperties": false
            }),
            risk: Risk::Caution,
            read_only: false,
        }
    }

    async fn call(&self, ctx: &ToolContext, args: Value) -> Result<ToolOutput, ToolError> {
        let args: CreateArgs =
            serde_json::from_value(args).map_err(|e| ToolError::Respond(e.to_string()))?;
        let (home, actor) = (ctx.home.clone(), actor(ctx, "create_skill"));
        let change = blocking(move || {
            crate::skills::create(
                &home,
                &args.name,
                &args.description,
                &args.instructions,
                &actor,
            )
            .map_err(|e| ToolError::Respond(e.to_string()))
        })
        .await?;
        Ok(ToolOutput::ok(format!(
            "Done: {}. It is in your prompt from the next turn (if its requirements are met).{}",
            change.item,
            recorded(&change.change, &change.warning)
        )))
    }
}

pub struct RemoveSkillTool;

#[derive(Deserialize)]
struct RemoveArgs {
    name: String,
}

#[async_trait]
impl ToolHandler for RemoveSkillTool {
    fn def(&self) -> ToolDef {
        ToolDef {
            name: "remove_skill",
            description: "Delete one of your skills (its folder under skills/). Your creator can restore it from \
                          the change history.",
            parameters: json!({
                "type": "object",
                "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 64}},
                "required": ["name"],
                "additionalProperties": false
            }),
            risk: Risk::Caution,
            read_only: false,
        }
    }

    async fn call(&self, ctx: &ToolContext, args: Value) -> Result<ToolOutput, ToolError> {
        let args: RemoveArgs =
            serde_json::from_value(args).map_err(|e| ToolError::Respond(e.to_string()))?;
        let (home, actor) = (ctx.home.clone(), actor(ctx, "remove_skill"));
        let change = blocking(move || {
            crate::skills::remove(&home, &args.name, &actor)
                .map_err(|e| ToolError::Respond(e.to_string()))
        })
        .await?;
        Ok(ToolOutput::ok(format!(
            "Done: {}.{}",
            change.item,
            recorded(&change.change, &change.warning)
        )))
    }
}

pub struct UpdateGenesisPromptTool;

#[derive(Deserialize)]
struct GenesisArgs {
    prompt: String,
    reason: String,
}

#[async_trait]
impl ToolHandler for UpdateGenesisPromptTool {
    fn def(&self) -> ToolDef {
        ToolDef {
            name: "update_genesis_prompt",
            description: "Rewrite your genesis prompt (your purpose, shown in every turn). Allowed rarely (once a \
                          day by default), at most 4000 characters; your constitution still overrides it. Give the \
                          reason: your creator sees it in the change history.",
            parameters: json!({
                "type": "object",
                "properties": {
                    "prompt": {"type": "string", "minLength": 1, "maxLength": 8000},
                    "reason": {"type": "string", "minLength": 1, "maxLength": 300}
                },
                "required": ["prompt", "reason"],
                "additionalProperties": false
            }),
            risk: Risk::Dangerous,
            read_only: false,
        }
    }

    async fn call(&self, ctx: &ToolContext, args: Value) -> Result<ToolOutput, ToolError> {
        let args: GenesisArgs =
            serde_json::from_value(args).map_err(|e| ToolError::Respond(e.to_string()))?;
        let (home, db, actor) = (
            ctx.home.clone(),
            ctx.db.clone(),
            actor(ctx, "update_genesis_prompt"),
        );
        let interval =
            std::time::Duration::from_secs(ctx.config.agent.genesis_update_interval_secs);
        let update = blocking(move || {
            crate::genesis::update_prompt(
                &home,
                &db,
                &args.prompt,
                &args.reason,
                &actor,
                interval,
                chrono::Utc::now(),
            )
            .map_err(|e| match e {
                crate::genesis::GenesisError::State(e) => ToolError::Fatal(e.to_string()),
                other => ToolError::Respond(other.to_string()),
            })
        })
        .await?;
        Ok(ToolOutput::ok(format!(
            "Done: your genesis prompt is rewritten; it applies from your next turn. The next change is allowed \
             after {}.{}",
            update.next_allowed.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            recorded(&update.change, &update.warning)
        )))
    }
}
