//! `l402_fetch`: the agent fetches a URL and, when the server asks for an L402 payment, pays for the credential
//! within `max_sats` and the budget (the buyer in `crate::l402::client`). A refusal or a failed payment is a result
//! for the model to act on, never a broken turn.

use std::sync::Arc;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::l402::client::{FetchRequest, L402Client, L402Error, DEFAULT_MAX_SATS};
use crate::tools::{Risk, ToolContext, ToolDef, ToolError, ToolHandler, ToolOutput};

/// How long the tool waits for a node that is still starting.
const READY_WAIT: std::time::Duration = std::time::Duration::from_secs(10);
/// Longest body shown to the model (the tool result cap applies after this too).
const BODY_CAP: usize = 8_000;

/// The L402 tools offered with a wallet: buying (`l402_fetch`) and selling (`set_service`).
pub fn tools() -> Vec<Arc<dyn ToolHandler>> {
    vec![Arc::new(L402FetchTool), Arc::new(SetServiceTool)]
}

pub struct L402FetchTool;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Args {
    url: String,
    method: Option<String>,
    body: Option<String>,
    headers: Option<std::collections::BTreeMap<String, String>>,
    max_sats: Option<u64>,
    purpose: Option<String>,
}

#[async_trait]
impl ToolHandler for L402FetchTool {
    fn def(&self) -> ToolDef {
        ToolDef {
            name: "l402_fetch",
            description: "Fetch an HTTP URL that may ask for payment (HTTP 402, L402). If it does, you pay the \
                          invoice from your wallet — at most max_sats, and only within your budget — and the \
                          request is retried with the credential, which is cached for later calls to that path. \
                          Returns the HTTP status, what was paid and the response body.",
            parameters: json!({
                "type": "object",
                "properties": {
                    "url": {"type": "string", "minLength": 8, "description": "http:// or https:// URL."},
                    "method": {"type": "string", "enum": ["GET", "POST", "PUT", "PATCH", "DELETE"]},
                    "body": {"type": "string", "description": "Request body (for POST/PUT/PATCH)."},
                    "headers": {"type": "object", "additionalProperties": {"type": "string"}},
                    "max_sats": {"type": "integer", "minimum": 1, "maximum": 1_000_000,
                                 "description": "The most you are willing to pay for this call (default 1000)."},
                    "purpose": {"type": "string", "description": "What the call is for (kept on the receipt)."}
                },
                "required": ["url"],
                "additionalProperties": false
            }),
            risk: Risk::Dangerous,
            read_only: false,
        }
    }

    async fn call(&self, ctx: &ToolContext, args: Value) -> Result<ToolOutput, ToolError> {
        let args: Args =
            serde_json::from_value(args).map_err(|e| ToolError::Respond(e.to_string()))?;
        let wallet = ctx
            .wallet
            .as_ref()
            .ok_or_else(|| ToolError::Respond("you have no wallet in this run".into()))?;
        wallet
            .wait_ready(READY_WAIT)
            .await
            .map_err(|e| ToolError::Respond(e.to_string()))?;
        let client =
            L402Client::new(wallet.clone()).map_err(|e| ToolError::Respond(e.to_string()))?;
        let method = args.method.clone().unwrap_or_else(|| {
            if args.body.is_some() {
                "POST".into()
            } else {
                "GET".into()
            }
        });
        let request = FetchRequest {
            url: args.url,
            method,
            headers: args.headers.unwrap_or_default().into_iter().collect(),
            body: args.body.map(String::into_bytes),
            max_sats: args.max_sats.unwrap_or(DEFAULT_MAX_SATS),
            purpose: args.purpose,
            timeout: None,
        };
        match client.fetch(request).await {
            Ok(response) => {
                let mut summary = response.summary();
                if let Value::String(text) = &summary["body"] {
                    if text.len() > BODY_CAP {
                        let mut cut = BODY_CAP;
                        while !text.is_char_boundary(cut) {
                            cut -= 1;
                        }
                        summary["body"] =
                            json!(format!("{}… [{} bytes in all]", &text[..cut], text.len()));
                    }
                }
                summary["paid_sats"] = json!(response.paid_msat / 1000);
                summary["receipt_id"] = json!(response.receipt_id);
                serde_json::to_string_pretty(&summary)
                    .map(ToolOutput::ok)
                    .map_err(|e| ToolError::Fatal(format!("encoding a tool result: {e}")))
            }
            Err(L402Error::State(e)) => Err(ToolError::Fatal(format!("state database: {e}"))),
            Err(e) if e.is_refusal() => Err(ToolError::Respond(format!("{e} (nothing was paid)"))),
            Err(e) => Err(ToolError::Respond(e.to_string())),
        }
    }
}

/// `set_service`: the agent declares (or withdraws) one of its paid services in `automaton.yaml`'s
/// `http.services`. The seller re-reads the file, so the service is on sale at once; the change is committed to the
/// home's history naming the tool and the turn, like every other change the agent makes to itself.
pub struct SetServiceTool;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceArgs {
    action: String,
    name: String,
    path: Option<String>,
    price_sats: Option<u64>,
    description: Option<String>,
    kind: Option<crate::config::services::ServiceKind>,
    response: Option<String>,
    command: Option<String>,
    skill: Option<String>,
    validity_secs: Option<u64>,
}

#[async_trait]
impl ToolHandler for SetServiceTool {
    fn def(&self) -> ToolDef {
        ToolDef {
            name: "set_service",
            description: "Sell something on your HTTP face behind an L402 paywall, or stop selling it. add: name, \
                          path (e.g. /l402/summarise), price_sats, description and kind: `skill` (your model runs \
                          the skill named `skill` on the buyer's text), `command` (runs `command` in your workspace, \
                          the request body on stdin, stdout is the answer), `static` (answers `response`) or \
                          `attestation` (a node-signed status). remove: name. On sale at once; your creator sees \
                          the change.",
            parameters: json!({
                "type": "object",
                "properties": {
                    "action": {"enum": ["add", "remove"], "type": "string"},
                    "name": {"type": "string", "pattern": "^[a-z0-9_-]{1,64}$"},
                    "path": {"type": "string", "description": "Where it is served, e.g. /l402/summarise."},
                    "price_sats": {"type": "integer", "minimum": 1, "maximum": 1000000},
                    "description": {"type": "string", "maxLength": 300},
                    "kind": {"enum": ["skill", "command", "static", "attestation"], "type": "string"},
                    "response": {"type": "string", "maxLength": 16000},
                    "command": {"type": "string", "maxLength": 2000},
                    "skill": {"type": "string", "maxLength": 64},
                    "validity_secs": {"type": "integer", "minimum": 60, "description": "How long one purchase is good for (default 3600)."}
                },
                "required": ["action", "name"],
                "additionalProperties": false
            }),
            risk: Risk::Caution,
            read_only: false,
        }
    }

    async fn call(&self, ctx: &ToolContext, args: Value) -> Result<ToolOutput, ToolError> {
        let args: ServiceArgs =
            serde_json::from_value(args).map_err(|e| ToolError::Respond(e.to_string()))?;
        let home = ctx.home.clone();
        let actor = crate::audit::Actor::tool("set_service", ctx.turn_id.as_deref());
        tokio::task::spawn_blocking(move || set_service(&home, &actor, args))
            .await
            .map_err(|e| ToolError::Fatal(format!("tool task failed: {e}")))?
            .map(ToolOutput::ok)
            .map_err(ToolError::Respond)
    }
}

/// Edits `http.services` in the file (not env or flag overrides), validated before anything is written.
fn set_service(
    home: &crate::home::Home,
    actor: &crate::audit::Actor,
    args: ServiceArgs,
) -> Result<String, String> {
    use crate::config::services::{
        ServiceConfig, DEFAULT_MAX_REQUEST_BYTES, DEFAULT_VALIDITY_SECS,
    };
    let _lock = crate::audit::lock(home).map_err(|e| e.to_string())?;
    let path = home.config_path();
    let text =
        std::fs::read_to_string(&path).map_err(|e| format!("cannot read the config: {e}"))?;
    let mut config = crate::config::Config::from_yaml(&text, &path).map_err(|e| e.to_string())?;
    let services = &mut config.http.services;
    let item = match args.action.as_str() {
        "remove" => {
            let before = services.len();
            services.retain(|s| s.name != args.name);
            if services.len() == before {
                return Err(format!("no service named {:?} is on sale", args.name));
            }
            format!("stop selling service {}", args.name)
        }
        "add" => {
            let (Some(path), Some(price_sats), Some(kind)) =
                (args.path, args.price_sats, args.kind)
            else {
                return Err("add needs path, price_sats and kind".to_string());
            };
            let service = ServiceConfig {
                name: args.name.clone(),
                path,
                price_sats,
                validity_secs: args.validity_secs.unwrap_or(DEFAULT_VALIDITY_SECS),
                description: args.description.unwrap_or_default(),
                kind,
                job_kind: None,
                response: args.response,
                content_type: None,
                command: args.command,
                skill: args.skill,
                timeout_secs: None,
                max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
            };
            if let crate::config::services::ServiceKind::Skill = kind {
                let name = service.skill.clone().unwrap_or_default();
                crate::skills::Library::for_home(home)
                    .find(&name)
                    .map_err(|e| format!("the skill behind the service: {e}"))?;
            }
            let item = format!(
                "sell service {} at {} ({} sats, {})",
                service.name,
                service.path,
                service.price_sats,
                kind.as_str()
            );
            match services.iter_mut().find(|s| s.name == service.name) {
                Some(existing) => *existing = service,
                None => services.push(service),
            }
            item
        }
        other => return Err(format!("unknown action {other:?}: add or remove")),
    };
    config
        .validate("set_service")
        .map_err(|e| format!("{e}; nothing was changed"))?;
    config.write(home).map_err(|e| e.to_string())?;
    let change = crate::audit::record(home, actor, &item).ok().flatten();
    let base = crate::http::Advertised::from_config(&config, None).public_url;
    let on_sale: Vec<String> = config
        .http
        .services
        .iter()
        .map(|s| format!("{} {}{} ({} sats)", s.name, base, s.path, s.price_sats))
        .collect();
    Ok(format!(
        "Done: {item}.{} On sale now: {}.",
        change
            .map(|id| format!(" Recorded as change {}.", crate::audit::short(&id)))
            .unwrap_or_default(),
        if on_sale.is_empty() {
            "nothing".to_string()
        } else {
            on_sale.join("; ")
        }
    ))
}
