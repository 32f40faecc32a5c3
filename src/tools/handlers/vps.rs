//! Compute the agent rents for itself at LNVPS, paid over Lightning from its own wallet through the budget gate:
//! `rent_vps`, `list_vps`, `renew_vps`. The VM is then usable with `exec` once the creator points the agent at it,
//! or by the agent with `automaton exec --vps` through `exec`.

use std::sync::Arc;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::{json, Value};

use super::json_output;
use crate::compute::lnvps::{LnvpsClient, RentRequest, VmManager, WalletPayer};
use crate::tools::{Risk, ToolContext, ToolDef, ToolError, ToolHandler, ToolOutput};

/// The VPS tools offered with a wallet.
pub fn tools() -> Vec<Arc<dyn ToolHandler>> {
    vec![
        Arc::new(RentVpsTool),
        Arc::new(ListVpsTool),
        Arc::new(RenewVpsTool),
    ]
}

fn manager(ctx: &ToolContext) -> Result<VmManager, ToolError> {
    let client = LnvpsClient::for_home(&ctx.home, &ctx.config)
        .map_err(|e| ToolError::Respond(e.to_string()))?;
    Ok(VmManager::new(&ctx.home, ctx.db.clone(), client))
}

/// The wallet once its node runs (a node that is still starting is worth a short wait).
async fn wallet(ctx: &ToolContext) -> Result<&crate::wallet::Wallet, ToolError> {
    let w = ctx
        .wallet
        .as_ref()
        .ok_or_else(|| ToolError::Respond("you have no wallet in this run".into()))?;
    w.wait_ready(std::time::Duration::from_secs(30))
        .await
        .map_err(|e| ToolError::Respond(format!("cannot pay now: {e}")))?;
    Ok(w)
}

pub struct RentVpsTool;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RentArgs {
    template: Option<Value>,
    image: Option<Value>,
    months: Option<u32>,
}

/// An id given as a number or a string, or a name.
fn text(value: Option<Value>) -> Option<String> {
    match value? {
        Value::String(s) => Some(s.trim().to_string()).filter(|s| !s.is_empty()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

#[async_trait]
impl ToolHandler for RentVpsTool {
    fn def(&self) -> ToolDef {
        ToolDef {
            name: "rent_vps",
            description: "Rent a VPS at LNVPS and pay its first period over Lightning from your wallet (through your \
                          budget; purpose compute.rent). Without arguments: the cheapest template and a Debian image. \
                          Waits until it runs and answers over SSH; returns its id, IP, user and paid-until date. It \
                          costs sats every period: rent only what you will use.",
            parameters: json!({
                "type": "object",
                "properties": {
                    "template": {"type": ["string", "integer"], "description": "Template id or name (default: the cheapest)."},
                    "image": {"type": ["string", "integer"], "description": "Image id or distribution, e.g. debian (default)."},
                    "months": {"type": "integer", "minimum": 1, "maximum": 12, "description": "Billing periods to pay for now (default 1)."}
                },
                "additionalProperties": false
            }),
            risk: Risk::Dangerous,
            read_only: false,
        }
    }

    async fn call(&self, ctx: &ToolContext, args: Value) -> Result<ToolOutput, ToolError> {
        let args: RentArgs =
            serde_json::from_value(args).map_err(|e| ToolError::Respond(e.to_string()))?;
        let manager = manager(ctx)?;
        let payer = WalletPayer(wallet(ctx).await?);
        let request = RentRequest {
            template: text(args.template),
            image: text(args.image),
            intervals: args.months.unwrap_or(1),
        };
        let vm = manager
            .rent(&request, &payer, &|step| tracing::info!(step, "rent_vps"))
            .await
            .map_err(|e| ToolError::Respond(format!("not rented: {e}")))?;
        json_output(serde_json::to_value(vm).map_err(|e| ToolError::Fatal(e.to_string()))?)
    }
}

pub struct ListVpsTool;

#[async_trait]
impl ToolHandler for ListVpsTool {
    fn def(&self) -> ToolDef {
        ToolDef {
            name: "list_vps",
            description:
                "The VPSes you rent at LNVPS: id, state, IP, user and until when they are paid.",
            parameters: json!({"type": "object", "properties": {}, "additionalProperties": false}),
            risk: Risk::Safe,
            read_only: true,
        }
    }

    async fn call(&self, ctx: &ToolContext, _args: Value) -> Result<ToolOutput, ToolError> {
        let manager = manager(ctx)?;
        let vms = match manager.list(true).await {
            Ok(vms) => vms,
            Err(_) => manager
                .list(false)
                .await
                .map_err(|e| ToolError::Respond(e.to_string()))?,
        };
        json_output(json!({ "vms": vms }))
    }
}

pub struct RenewVpsTool;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RenewArgs {
    id: Value,
    months: Option<u32>,
}

#[async_trait]
impl ToolHandler for RenewVpsTool {
    fn def(&self) -> ToolDef {
        ToolDef {
            name: "renew_vps",
            description: "Pay for one more period of a VPS you rent (through your budget; purpose compute.rent). \
                          Your heartbeat's renew_vps task does this before expiry by itself.",
            parameters: json!({
                "type": "object",
                "properties": {
                    "id": {"type": ["integer", "string"], "description": "The VM id (see list_vps)."},
                    "months": {"type": "integer", "minimum": 1, "maximum": 12}
                },
                "required": ["id"],
                "additionalProperties": false
            }),
            risk: Risk::Caution,
            read_only: false,
        }
    }

    async fn call(&self, ctx: &ToolContext, args: Value) -> Result<ToolOutput, ToolError> {
        let args: RenewArgs =
            serde_json::from_value(args).map_err(|e| ToolError::Respond(e.to_string()))?;
        let id: u64 = text(Some(args.id.clone()))
            .and_then(|t| t.parse().ok())
            .ok_or_else(|| ToolError::Respond(format!("{} is not a VM id", args.id)))?;
        let manager = manager(ctx)?;
        if manager
            .get(id)
            .await
            .map_err(|e| ToolError::Respond(e.to_string()))?
            .is_none()
        {
            return Err(ToolError::Respond(format!(
                "VM {id} is not one you rent (see list_vps)"
            )));
        }
        let payer = WalletPayer(wallet(ctx).await?);
        let paid = manager
            .pay_renewal(id, args.months.unwrap_or(1), &payer, &|_| {})
            .await
            .map_err(|e| ToolError::Respond(format!("not renewed: {e}")))?;
        let vm = manager
            .client()
            .vm(id)
            .await
            .map_err(|e| ToolError::Respond(e.to_string()))?;
        json_output(json!({"id": id, "added_secs": paid.time, "expires": vm.expires}))
    }
}
