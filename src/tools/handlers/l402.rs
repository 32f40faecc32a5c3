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

/// The L402 tools offered with a wallet.
pub fn tools() -> Vec<Arc<dyn ToolHandler>> {
    vec![Arc::new(L402FetchTool)]
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
