//! The family tools: `spawn_child` (rent a machine, install and fund a child; runs in the background and resumes
//! after a restart), `list_children`, `check_child`, `fund_child`, `message_child`.

use std::sync::Arc;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::{json, Value};

use super::json_output;
use crate::compute::lnvps::WalletPayer;
use crate::replication::spawn::{SpawnRequest, Spawner};
use crate::replication::{self, health, messages, ReplicationError};
use crate::tools::{Risk, ToolContext, ToolDef, ToolError, ToolHandler, ToolOutput};

/// The family tools, offered with a wallet and a Nostr presence.
pub fn tools() -> Vec<Arc<dyn ToolHandler>> {
    vec![
        Arc::new(SpawnChildTool),
        Arc::new(ListChildrenTool),
        Arc::new(CheckChildTool),
        Arc::new(FundChildTool),
        Arc::new(MessageChildTool),
        Arc::new(MessageParentTool),
    ]
}

fn respond(e: ReplicationError) -> ToolError {
    ToolError::Respond(e.to_string())
}

fn parse<T: serde::de::DeserializeOwned>(args: Value) -> Result<T, ToolError> {
    serde_json::from_value(args).map_err(|e| ToolError::Respond(e.to_string()))
}

fn name_param() -> Value {
    json!({"type": "string", "description": "The child's name (see list_children)."})
}

pub struct SpawnChildTool;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SpawnArgs {
    name: String,
    specialization: String,
    fund_sats: u64,
    provider: Option<String>,
    template: Option<String>,
}

#[async_trait]
impl ToolHandler for SpawnChildTool {
    fn def(&self) -> ToolDef {
        ToolDef {
            name: "spawn_child",
            description: "Create a child agent: rent a VPS at LNVPS (paid over Lightning from your wallet), install \
                          yourself there, set the child up with your specialization for it, start it and give it \
                          fund_sats. Costs the VPS's first period plus fund_sats, through your budget. Refused below \
                          the normal tier or at replication.max_children. Returns at once; the spawn goes on in the \
                          background (and resumes after a restart): follow it with check_child.",
            parameters: json!({
                "type": "object",
                "properties": {
                    "name": {"type": "string", "description": "Lowercase letters, digits, '-' or '_'."},
                    "specialization": {"type": "string", "description": "What the child is for, in plain words."},
                    "fund_sats": {"type": "integer", "minimum": 1, "description": "Sats the child starts its life with."},
                    "provider": {"type": "string", "enum": ["lnvps", "ssh", "local", "conway"], "description": "Where it lives (default lnvps)."},
                    "template": {"type": "string", "description": "LNVPS template id or name (default: the cheapest)."}
                },
                "required": ["name", "specialization", "fund_sats"],
                "additionalProperties": false
            }),
            risk: Risk::Dangerous,
            read_only: false,
        }
    }

    async fn call(&self, ctx: &ToolContext, args: Value) -> Result<ToolOutput, ToolError> {
        let args: SpawnArgs = parse(args)?;
        let wallet = ctx
            .wallet
            .clone()
            .ok_or_else(|| ToolError::Respond("you have no wallet in this run".into()))?;
        let request = SpawnRequest {
            name: args.name.trim().to_string(),
            specialization: args.specialization,
            fund_sats: args.fund_sats,
            provider: args.provider.unwrap_or_else(|| "lnvps".into()),
            template: args.template,
        };
        let child = replication::spawn::request(&ctx.home, &ctx.config, &ctx.db, &request)
            .await
            .map_err(respond)?;
        let (home, config, db, name) = (
            ctx.home.clone(),
            Arc::clone(&ctx.config),
            ctx.db.clone(),
            child.name.clone(),
        );
        tokio::spawn(async move {
            let payer = WalletPayer(&wallet);
            let spawner = Spawner {
                home: &home,
                config: &config,
                db: &db,
                payer: &payer,
                progress: &|step| tracing::info!(step, "spawn_child"),
            };
            match spawner.drive(&name).await {
                Ok(c) => tracing::info!(child = %name, state = %c.state, "spawn finished"),
                Err(e) => {
                    tracing::warn!(child = %name, error = %e, "spawn attempt failed; the heartbeat retries")
                }
            }
        });
        json_output(json!({
            "name": child.name,
            "state": child.state,
            "note": "the spawn runs in the background; call check_child to follow it",
        }))
    }
}

pub struct ListChildrenTool;

#[async_trait]
impl ToolHandler for ListChildrenTool {
    fn def(&self) -> ToolDef {
        ToolDef {
            name: "list_children",
            description: "Your children: name, state (requested … alive, unhealthy, dead), node id, npub, last known \
                          balance, VM.",
            parameters: json!({"type": "object", "properties": {}, "additionalProperties": false}),
            risk: Risk::Safe,
            read_only: true,
        }
    }

    async fn call(&self, ctx: &ToolContext, _args: Value) -> Result<ToolOutput, ToolError> {
        let list = replication::list(&ctx.db)
            .await
            .map_err(|e| ToolError::Respond(e.to_string()))?;
        json_output(json!({ "children": list }))
    }
}

pub struct CheckChildTool;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NameArgs {
    name: String,
}

#[async_trait]
impl ToolHandler for CheckChildTool {
    fn def(&self) -> ToolDef {
        ToolDef {
            name: "check_child",
            description: "Look at one child now (its HTTP face, its status over its machine, its Nostr card) and \
                          return its state, balance, last error and state history.",
            parameters: json!({
                "type": "object",
                "properties": {"name": name_param()},
                "required": ["name"],
                "additionalProperties": false
            }),
            risk: Risk::Safe,
            read_only: true,
        }
    }

    async fn call(&self, ctx: &ToolContext, args: Value) -> Result<ToolOutput, ToolError> {
        let args: NameArgs = parse(args)?;
        let child = health::check(&ctx.home, &ctx.config, &ctx.db, &args.name)
            .await
            .map_err(respond)?;
        let history = replication::transitions(&ctx.db, &args.name)
            .await
            .map_err(|e| ToolError::Respond(e.to_string()))?;
        json_output(json!({ "child": child, "transitions": history }))
    }
}

pub struct FundChildTool;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FundArgs {
    name: String,
    sats: u64,
}

#[async_trait]
impl ToolHandler for FundChildTool {
    fn def(&self) -> ToolDef {
        ToolDef {
            name: "fund_child",
            description: "Send sats to a running child (an invoice from the child, paid through your budget; \
                          purpose replication.fund).",
            parameters: json!({
                "type": "object",
                "properties": {"name": name_param(), "sats": {"type": "integer", "minimum": 1}},
                "required": ["name", "sats"],
                "additionalProperties": false
            }),
            risk: Risk::Dangerous,
            read_only: false,
        }
    }

    async fn call(&self, ctx: &ToolContext, args: Value) -> Result<ToolOutput, ToolError> {
        let args: FundArgs = parse(args)?;
        let wallet = ctx
            .wallet
            .as_ref()
            .ok_or_else(|| ToolError::Respond("you have no wallet in this run".into()))?;
        let hash = health::fund(
            &ctx.home,
            &ctx.config,
            &ctx.db,
            &args.name,
            args.sats,
            &WalletPayer(wallet),
        )
        .await
        .map_err(respond)?;
        json_output(json!({"child": args.name, "amount_sats": args.sats, "payment_hash": hash}))
    }
}

pub struct MessageChildTool;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MessageArgs {
    name: String,
    text: String,
}

#[async_trait]
impl ToolHandler for MessageChildTool {
    fn def(&self) -> ToolDef {
        ToolDef {
            name: "message_child",
            description: "Send a child a private Nostr message (NIP-17); it reaches the child's agent loop as a \
                          message from its parent.",
            parameters: json!({
                "type": "object",
                "properties": {"name": name_param(), "text": {"type": "string", "maxLength": 4000}},
                "required": ["name", "text"],
                "additionalProperties": false
            }),
            risk: Risk::Caution,
            read_only: false,
        }
    }

    async fn call(&self, ctx: &ToolContext, args: Value) -> Result<ToolOutput, ToolError> {
        let args: MessageArgs = parse(args)?;
        let child = replication::require(&ctx.db, &args.name)
            .await
            .map_err(respond)?;
        let npub = child.npub.ok_or_else(|| {
            ToolError::Respond(format!(
                "{} has no npub yet (its setup has not run)",
                args.name
            ))
        })?;
        let id = messages::send(
            &ctx.home,
            &ctx.config,
            &ctx.db,
            &format!("child:{}", args.name),
            &npub,
            &args.text,
        )
        .await
        .map_err(respond)?;
        json_output(json!({"child": args.name, "event_id": id}))
    }
}

pub struct MessageParentTool;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ParentMessageArgs {
    text: String,
}

#[async_trait]
impl ToolHandler for MessageParentTool {
    fn def(&self) -> ToolDef {
        ToolDef {
            name: "message_parent",
            description: "Send the agent that spawned you a private Nostr message (NIP-17): news, a request for \
                          sats, a question. Only for a child (nostr.parent is set).",
            parameters: json!({
                "type": "object",
                "properties": {"text": {"type": "string", "maxLength": 4000}},
                "required": ["text"],
                "additionalProperties": false
            }),
            risk: Risk::Caution,
            read_only: false,
        }
    }

    async fn call(&self, ctx: &ToolContext, args: Value) -> Result<ToolOutput, ToolError> {
        let args: ParentMessageArgs = parse(args)?;
        let parent = ctx.config.nostr.parent.clone().ok_or_else(|| {
            ToolError::Respond("you have no parent agent (nostr.parent is not set)".into())
        })?;
        let id = messages::send(
            &ctx.home,
            &ctx.config,
            &ctx.db,
            "parent",
            &parent,
            &args.text,
        )
        .await
        .map_err(respond)?;
        json_output(json!({"parent": parent, "event_id": id}))
    }
}
