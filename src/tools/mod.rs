//! Tools: the registry that is the single gate every tool call passes (argument validation against the tool's
//! JSON schema, policy, timing, tracing, result size cap) and the tool handlers behind it.
//!
//! Errors have two channels. Anything the model can recover from (unknown tool, bad arguments, a refused path, a
//! failed command) comes back to it as the tool's result with `is_error`; only a broken runtime (the state DB
//! gone) is a `FatalToolError` that aborts the turn.

pub mod handlers;
pub mod paths;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::Serialize;
use serde_json::Value;
use tracing::Instrument;

use crate::compute::ComputeProvider;
use crate::config::Config;
use crate::home::Home;
use crate::inference::{ToolCall, ToolSpec};
use crate::state::Db;
pub use paths::{PathRefusal, ProtectedPaths};

/// How much harm a tool can do. `Dangerous` tools (spending, deleting, replicating, changing identity or purpose)
/// need the agent's own authority.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Risk {
    Safe,
    Caution,
    Dangerous,
}

impl Risk {
    pub fn as_str(self) -> &'static str {
        match self {
            Risk::Safe => "safe",
            Risk::Caution => "caution",
            Risk::Dangerous => "dangerous",
        }
    }
}

/// Who a turn acts for, derived from what started it. Peers, skills and tool output never carry the agent's
/// own authority.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Authority {
    /// The agent itself (its own wake-up, its schedule).
    Agent,
    /// The agent's creator.
    Creator,
    /// Anyone else: a peer's message, an incoming request.
    External,
}

/// A tool's public description.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolDef {
    pub name: &'static str,
    pub description: &'static str,
    pub parameters: Value,
    pub risk: Risk,
    /// A tool that only looks (status, reads): turns made only of these are "maintenance" for the loop guard.
    pub read_only: bool,
}

/// What the loop should do after a tool ran.
#[derive(Clone, Debug, PartialEq)]
pub enum Control {
    /// End the turn and sleep (capped by `agent.max_sleep_secs`) or until a wake event.
    Sleep {
        seconds: u64,
        reason: Option<String>,
    },
}

/// A handler's answer.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolOutput {
    pub content: String,
    /// The tool ran but failed (a command exited non-zero, timed out).
    pub is_error: bool,
    pub control: Option<Control>,
}

impl ToolOutput {
    pub fn ok(content: impl Into<String>) -> ToolOutput {
        ToolOutput {
            content: content.into(),
            is_error: false,
            control: None,
        }
    }
}

/// Errors a handler can raise.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    /// The model should read this and do something else.
    #[error("{0}")]
    Respond(String),
    /// The runtime is broken; the turn cannot continue.
    #[error("{0}")]
    Fatal(String),
}

impl From<PathRefusal> for ToolError {
    fn from(e: PathRefusal) -> Self {
        ToolError::Respond(e.to_string())
    }
}

impl From<crate::compute::ComputeError> for ToolError {
    fn from(e: crate::compute::ComputeError) -> Self {
        ToolError::Respond(e.to_string())
    }
}

impl From<crate::state::StateError> for ToolError {
    fn from(e: crate::state::StateError) -> Self {
        ToolError::Fatal(format!("state database: {e}"))
    }
}

/// The runtime failed while running a tool; the turn is aborted.
#[derive(Debug, thiserror::Error)]
#[error("tool {tool} failed fatally: {message}")]
pub struct FatalToolError {
    pub tool: String,
    pub message: String,
}

/// Everything a tool may use. Shared by all calls of a run.
#[derive(Clone)]
pub struct ToolContext {
    pub home: Home,
    pub config: Arc<Config>,
    pub db: Db,
    pub compute: Arc<dyn ComputeProvider>,
    pub protected: ProtectedPaths,
    /// When this `automaton run` started (for uptime).
    pub started_at: chrono::DateTime<chrono::Utc>,
    /// The agent's Lightning wallet (`None` in a home without one); the money tools use it.
    pub wallet: Option<crate::wallet::Wallet>,
    /// The home's skills (the prompt and the skill tools share the cache).
    pub skills: crate::skills::Library,
    /// The turn now running (set by the agent loop each turn); named in audit commits of self-changes.
    pub turn_id: Option<String>,
}

/// One tool.
#[async_trait]
pub trait ToolHandler: Send + Sync {
    fn def(&self) -> ToolDef;
    /// Runs with arguments that already passed the schema and the policy.
    async fn call(&self, ctx: &ToolContext, args: Value) -> Result<ToolOutput, ToolError>;
}

/// A policy decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Deny(String),
}

/// The policy hook of the gate. Budgets for spending tools plug in here in the wallet issue.
pub trait ToolPolicy: Send + Sync {
    fn check(&self, tool: &ToolDef, args: &Value, authority: Authority) -> Decision;
}

/// The built-in rule: dangerous tools need the agent's own or its creator's authority.
#[derive(Clone, Copy, Debug, Default)]
pub struct AuthorityPolicy;

impl ToolPolicy for AuthorityPolicy {
    fn check(&self, tool: &ToolDef, _args: &Value, authority: Authority) -> Decision {
        if tool.risk == Risk::Dangerous && authority == Authority::External {
            return Decision::Deny(format!(
                "{} is dangerous and this turn was started by someone else, not by you or your creator",
                tool.name
            ));
        }
        Decision::Allow
    }
}

/// The result of one call through the gate, as recorded and as fed back to the model.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolResult {
    pub content: String,
    pub is_error: bool,
    pub duration: Duration,
    pub control: Option<Control>,
    /// The tool is read-only (or unknown/refused, which changed nothing).
    pub read_only: bool,
}

struct Registered {
    def: ToolDef,
    schema: jsonschema::JSONSchema,
    handler: Arc<dyn ToolHandler>,
}

/// The single gate in front of every tool.
pub struct Registry {
    tools: BTreeMap<&'static str, Registered>,
    order: Vec<&'static str>,
    policy: Box<dyn ToolPolicy>,
    result_cap: usize,
}

/// A tool's schema did not compile: a programming error caught by the registry's tests.
#[derive(Debug, thiserror::Error)]
#[error("tool {tool}: invalid JSON schema: {message}")]
pub struct SchemaError {
    pub tool: String,
    pub message: String,
}

impl Registry {
    pub fn new(policy: Box<dyn ToolPolicy>, result_cap: usize) -> Registry {
        Registry {
            tools: BTreeMap::new(),
            order: Vec::new(),
            policy,
            result_cap,
        }
    }

    /// This registry with another policy hook (the agent's survival-aware policy, `money::routing::TierToolPolicy`).
    pub fn with_policy(mut self, policy: Box<dyn ToolPolicy>) -> Registry {
        self.policy = policy;
        self
    }

    /// The registry with every built-in tool of this issue.
    pub fn with_builtin_tools(result_cap: usize) -> Result<Registry, SchemaError> {
        let mut registry = Registry::new(Box::new(AuthorityPolicy), result_cap);
        for handler in handlers::builtin() {
            registry.register(handler)?;
        }
        Ok(registry)
    }

    /// The tools an agent is offered: the built-in ones, the money tools when it has a wallet, the Nostr tools
    /// when it has relays. `automaton run` and the tests that pin the tool list both use this.
    pub fn for_agent(
        result_cap: usize,
        wallet: bool,
        nostr: bool,
    ) -> Result<Registry, SchemaError> {
        let mut registry = Registry::with_builtin_tools(result_cap)?;
        if wallet {
            for tool in handlers::wallet::tools()
                .into_iter()
                .chain(handlers::l402::tools())
                .chain(handlers::vps::tools())
                .chain(handlers::replication::tools())
            {
                registry.register(tool)?;
            }
        }
        if nostr {
            for tool in handlers::nostr::tools() {
                registry.register(tool)?;
            }
        }
        Ok(registry)
    }

    pub fn register(&mut self, handler: Arc<dyn ToolHandler>) -> Result<(), SchemaError> {
        let def = handler.def();
        let schema = jsonschema::JSONSchema::compile(&def.parameters).map_err(|e| SchemaError {
            tool: def.name.to_string(),
            message: e.to_string(),
        })?;
        if !self.tools.contains_key(def.name) {
            self.order.push(def.name);
        }
        self.tools.insert(
            def.name,
            Registered {
                def,
                schema,
                handler,
            },
        );
        Ok(())
    }

    /// Tool definitions in registration order.
    pub fn defs(&self) -> Vec<&ToolDef> {
        self.order
            .iter()
            .filter_map(|n| self.tools.get(n).map(|r| &r.def))
            .collect()
    }

    /// The schemas offered to the model.
    pub fn specs(&self) -> Vec<ToolSpec> {
        self.defs()
            .into_iter()
            .map(|d| ToolSpec {
                name: d.name.to_string(),
                description: d.description.to_string(),
                parameters: d.parameters.clone(),
            })
            .collect()
    }

    pub fn get(&self, name: &str) -> Option<&ToolDef> {
        self.tools.get(name).map(|r| &r.def)
    }

    /// Runs one call through the gate.
    pub async fn dispatch(
        &self,
        ctx: &ToolContext,
        call: &ToolCall,
        authority: Authority,
    ) -> Result<ToolResult, FatalToolError> {
        let started = Instant::now();
        let refuse = |content: String| ToolResult {
            content,
            is_error: true,
            duration: started.elapsed(),
            control: None,
            read_only: true,
        };
        let Some(tool) = self.tools.get(call.name.as_str()) else {
            tracing::info!(tool = %call.name, "model called an unknown tool");
            return Ok(refuse(format!(
                "Error: there is no tool named {:?}. Available tools: {}.",
                call.name,
                self.order.join(", ")
            )));
        };
        let args = match parse_arguments(&call.arguments) {
            Ok(v) => v,
            Err(msg) => {
                return Ok(refuse(format!(
                    "Error: the arguments for {} are not a JSON object ({msg}). Expected: {}",
                    call.name, tool.def.parameters
                )))
            }
        };
        if let Err(errors) = tool.schema.validate(&args) {
            let problems: Vec<String> = errors
                .map(|e| {
                    let at = e.instance_path.to_string();
                    if at.is_empty() {
                        e.to_string()
                    } else {
                        format!("{at}: {e}")
                    }
                })
                .collect();
            return Ok(refuse(format!(
                "Error: invalid arguments for {}: {}. Expected: {}",
                call.name,
                problems.join("; "),
                tool.def.parameters
            )));
        }
        if let Decision::Deny(reason) = self.policy.check(&tool.def, &args, authority) {
            tracing::warn!(tool = %call.name, %reason, "tool call refused by policy");
            return Ok(refuse(format!("Error: refused by policy: {reason}")));
        }

        let span = tracing::info_span!("tool", name = %call.name, risk = tool.def.risk.as_str());
        let outcome = tool.handler.call(ctx, args).instrument(span).await;
        let duration = started.elapsed();
        let (content, is_error, control) = match outcome {
            Ok(out) => (out.content, out.is_error, out.control),
            Err(ToolError::Respond(msg)) => (format!("Error: {msg}"), true, None),
            Err(ToolError::Fatal(message)) => {
                tracing::error!(tool = %call.name, %message, "tool failed fatally");
                return Err(FatalToolError {
                    tool: call.name.clone(),
                    message,
                });
            }
        };
        tracing::info!(
            tool = %call.name,
            is_error,
            duration_ms = duration.as_millis() as u64,
            "tool call finished"
        );
        Ok(ToolResult {
            content: cap_text(&content, self.result_cap),
            is_error,
            duration,
            control,
            read_only: tool.def.read_only,
        })
    }
}

fn parse_arguments(raw: &str) -> Result<Value, String> {
    // Some models send "" for a tool without parameters.
    if raw.trim().is_empty() {
        return Ok(Value::Object(Default::default()));
    }
    match serde_json::from_str::<Value>(raw) {
        Ok(Value::Object(map)) => Ok(Value::Object(map)),
        Ok(other) => Err(format!("got {}", json_type(&other))),
        Err(e) => Err(e.to_string()),
    }
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Cuts text to at most `cap` bytes on a character boundary, saying how much was left out.
pub fn cap_text(text: &str, cap: usize) -> String {
    if text.len() <= cap {
        return text.to_string();
    }
    let mut end = cap;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}\n[… {} more bytes cut]", &text[..end], text.len() - end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_schemas_compile_and_names_are_unique() {
        let r = Registry::with_builtin_tools(1000).expect("registry");
        let names: Vec<&str> = r.defs().iter().map(|d| d.name).collect();
        assert_eq!(
            names,
            vec![
                "exec",
                "read_file",
                "write_file",
                "sleep",
                "system_synopsis",
                "modify_heartbeat",
                "list_skills",
                "create_skill",
                "remove_skill",
                "update_genesis_prompt"
            ]
        );
    }

    #[test]
    fn caps_text_on_char_boundaries() {
        assert_eq!(cap_text("abc", 5), "abc");
        let cut = cap_text("ééé", 3);
        assert!(cut.starts_with("é\n[… 4 more bytes cut]"), "{cut}");
    }

    #[test]
    fn argument_parsing() {
        assert_eq!(parse_arguments(""), Ok(serde_json::json!({})));
        assert!(parse_arguments("[1]").is_err());
        assert!(parse_arguments("{oops").is_err());
    }

    #[test]
    fn dangerous_tools_need_own_authority() {
        let def = ToolDef {
            name: "pay_invoice",
            description: "",
            parameters: serde_json::json!({}),
            risk: Risk::Dangerous,
            read_only: false,
        };
        let p = AuthorityPolicy;
        assert_eq!(
            p.check(&def, &Value::Null, Authority::Agent),
            Decision::Allow
        );
        assert_eq!(
            p.check(&def, &Value::Null, Authority::Creator),
            Decision::Allow
        );
        assert!(matches!(
            p.check(&def, &Value::Null, Authority::External),
            Decision::Deny(_)
        ));
    }
}
