//! The money tools: `check_balance`, `create_invoice`, `pay_invoice`, `send_payment` (keysend), `list_receipts`,
//! `check_budget`. Spending goes through `wallet::spend`, i.e. the budget gate; a refusal comes back to the model
//! as the tool's result (nothing was paid), never as a broken turn.

use std::sync::Arc;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::{json, Value};

use super::json_output;
use crate::money::receipts::{self, Direction, ReceiptFilter};
use crate::money::tiers;
use crate::tools::{Risk, ToolContext, ToolDef, ToolError, ToolHandler, ToolOutput};
use crate::wallet::spend::{self, ApprovalWait};
use crate::wallet::{NodeState, Wallet, WalletError};

/// How long a money tool waits for a node that is still starting before telling the model to try later.
const READY_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Every money tool, in the order they are offered.
pub fn tools() -> Vec<Arc<dyn ToolHandler>> {
    vec![
        Arc::new(CheckBalanceTool),
        Arc::new(CreateInvoiceTool),
        Arc::new(PayInvoiceTool),
        Arc::new(SendPaymentTool),
        Arc::new(ListReceiptsTool),
        Arc::new(CheckBudgetTool),
    ]
}

fn wallet(ctx: &ToolContext) -> Result<&Wallet, ToolError> {
    ctx.wallet
        .as_ref()
        .ok_or_else(|| ToolError::Respond("you have no wallet in this run".into()))
}

async fn ready(ctx: &ToolContext) -> Result<&Wallet, ToolError> {
    let w = wallet(ctx)?;
    // A node that is starting for the first time is worth a short wait; one whose chain source keeps failing is
    // not: the model hears why at once and can get on with something else.
    let wait = match w.state() {
        NodeState::Starting {
            last_error: Some(_),
            ..
        }
        | NodeState::Failed { .. }
        | NodeState::Stopped => std::time::Duration::ZERO,
        _ => READY_WAIT,
    };
    w.wait_ready(wait).await.map_err(respond)?;
    Ok(w)
}

/// A wallet error for the model: policy refusals and failed payments are results to act on; only a broken state
/// DB ends the turn.
fn respond(e: WalletError) -> ToolError {
    match e {
        WalletError::State(e) => ToolError::Fatal(format!("state database: {e}")),
        WalletError::Budget(b) if b.is_refusal() => {
            ToolError::Respond(format!("refused by the budget (nothing was paid): {b}"))
        }
        other => ToolError::Respond(other.to_string()),
    }
}

fn parse<T: serde::de::DeserializeOwned>(args: Value) -> Result<T, ToolError> {
    serde_json::from_value(args).map_err(|e| ToolError::Respond(e.to_string()))
}

pub struct CheckBalanceTool;

#[async_trait]
impl ToolHandler for CheckBalanceTool {
    fn def(&self) -> ToolDef {
        ToolDef {
            name: "check_balance",
            description: "Your wallet's balance in sats (spendable Lightning plus on-chain), what you can receive \
                          over existing channels, and your survival tier.",
            parameters: json!({"type": "object", "properties": {}, "additionalProperties": false}),
            risk: Risk::Safe,
            read_only: true,
        }
    }

    async fn call(&self, ctx: &ToolContext, _args: Value) -> Result<ToolOutput, ToolError> {
        let w = ready(ctx).await?;
        let balance = w.balance().map_err(respond)?;
        let tier = tiers::load_tier(&ctx.db).await?;
        json_output(json!({
            "balance_sats": balance.balance_sats,
            "spendable_lightning_sats": balance.spendable_lightning_sats,
            "spendable_onchain_sats": balance.spendable_onchain_sats,
            "can_receive_sats": balance.inbound_sats,
            "tier": tier,
            "node_id": w.node_id(),
        }))
    }
}

pub struct CreateInvoiceTool;

#[derive(Deserialize)]
struct InvoiceArgs {
    amount_sats: u64,
    memo: Option<String>,
    expiry_secs: Option<u32>,
    purpose: Option<String>,
}

#[async_trait]
impl ToolHandler for CreateInvoiceTool {
    fn def(&self) -> ToolDef {
        ToolDef {
            name: "create_invoice",
            description:
                "Create a Lightning invoice someone can pay you (a new channel from your LSP opens \
                          automatically if needed; its fee is taken from the payment).",
            parameters: json!({
                "type": "object",
                "properties": {
                    "amount_sats": {"type": "integer", "minimum": 1, "description": "Amount in sats."},
                    "memo": {"type": "string", "maxLength": 639, "description": "Shown to the payer."},
                    "expiry_secs": {"type": "integer", "minimum": 60, "maximum": 604800},
                    "purpose": {"type": "string", "description": "What the money is for (kept on the receipt)."}
                },
                "required": ["amount_sats"],
                "additionalProperties": false
            }),
            risk: Risk::Safe,
            read_only: false,
        }
    }

    async fn call(&self, ctx: &ToolContext, args: Value) -> Result<ToolOutput, ToolError> {
        let args: InvoiceArgs = parse(args)?;
        let w = ready(ctx).await?;
        let amount_msat = args
            .amount_sats
            .checked_mul(1000)
            .ok_or_else(|| ToolError::Respond("amount_sats is too large".into()))?;
        let invoice = w
            .create_invoice_with_expiry(
                amount_msat,
                args.memo.as_deref(),
                args.purpose.as_deref(),
                args.expiry_secs,
            )
            .await
            .map_err(respond)?;
        json_output(json!({
            "bolt11": invoice.bolt11,
            "payment_hash": invoice.payment_hash,
            "amount_sats": args.amount_sats,
            "jit_channel": invoice.jit_channel,
            "expires_at": invoice.expires_at,
        }))
    }
}

pub struct PayInvoiceTool;

#[derive(Deserialize)]
struct PayArgs {
    bolt11: String,
    max_fee_sats: Option<u64>,
    purpose: String,
}

#[async_trait]
impl ToolHandler for PayInvoiceTool {
    fn def(&self) -> ToolDef {
        ToolDef {
            name: "pay_invoice",
            description:
                "Pay a Lightning invoice. Goes through your creator's budget (caps, reserve floor, \
                          approvals); returns the proof of payment or why it was refused or failed.",
            parameters: json!({
                "type": "object",
                "properties": {
                    "bolt11": {"type": "string", "minLength": 10, "description": "The BOLT 11 invoice."},
                    "max_fee_sats": {"type": "integer", "minimum": 0, "description": "Most to pay in routing fees."},
                    "purpose": {"type": "string", "minLength": 1, "description": "What you are paying for."}
                },
                "required": ["bolt11", "purpose"],
                "additionalProperties": false
            }),
            risk: Risk::Dangerous,
            read_only: false,
        }
    }

    async fn call(&self, ctx: &ToolContext, args: Value) -> Result<ToolOutput, ToolError> {
        let args: PayArgs = parse(args)?;
        let w = ready(ctx).await?;
        let paid = spend::pay_invoice(
            w,
            &args.bolt11,
            None,
            args.max_fee_sats.map(|s| s.saturating_mul(1000)),
            &args.purpose,
            ApprovalWait(None),
        )
        .await
        .map_err(respond)?;
        json_output(json!({
            "paid": true,
            "payment_hash": paid.payment_hash,
            "amount_sats": paid.amount_msat / 1000,
            "fee_msat": paid.fee_msat,
            "proof": "the preimage hashes to the payment hash (stored on the receipt)",
            "receipt_id": paid.receipt_id,
        }))
    }
}

pub struct SendPaymentTool;

#[derive(Deserialize)]
struct SendArgs {
    node_id: String,
    amount_sats: u64,
    max_fee_sats: Option<u64>,
    purpose: String,
}

#[async_trait]
impl ToolHandler for SendPaymentTool {
    fn def(&self) -> ToolDef {
        ToolDef {
            name: "send_payment",
            description: "Send sats to a Lightning node by its node id (keysend). Reaches public or directly \
                          connected nodes only; agents on private channels must be paid by invoice. Goes through \
                          your creator's budget.",
            parameters: json!({
                "type": "object",
                "properties": {
                    "node_id": {"type": "string", "pattern": "^0[23][0-9a-fA-F]{64}$"},
                    "amount_sats": {"type": "integer", "minimum": 1},
                    "max_fee_sats": {"type": "integer", "minimum": 0},
                    "purpose": {"type": "string", "minLength": 1}
                },
                "required": ["node_id", "amount_sats", "purpose"],
                "additionalProperties": false
            }),
            risk: Risk::Dangerous,
            read_only: false,
        }
    }

    async fn call(&self, ctx: &ToolContext, args: Value) -> Result<ToolOutput, ToolError> {
        let args: SendArgs = parse(args)?;
        let w = ready(ctx).await?;
        let amount_msat = args
            .amount_sats
            .checked_mul(1000)
            .ok_or_else(|| ToolError::Respond("amount_sats is too large".into()))?;
        let paid = spend::keysend(
            w,
            &args.node_id,
            amount_msat,
            args.max_fee_sats.map(|s| s.saturating_mul(1000)),
            &args.purpose,
            ApprovalWait(None),
        )
        .await
        .map_err(respond)?;
        json_output(json!({
            "paid": true,
            "payment_hash": paid.payment_hash,
            "amount_sats": paid.amount_msat / 1000,
            "fee_msat": paid.fee_msat,
            "receipt_id": paid.receipt_id,
        }))
    }
}

pub struct ListReceiptsTool;

#[derive(Deserialize)]
struct ListArgs {
    limit: Option<u32>,
    direction: Option<String>,
}

#[async_trait]
impl ToolHandler for ListReceiptsTool {
    fn def(&self) -> ToolDef {
        ToolDef {
            name: "list_receipts",
            description: "Your receipts: every payment in and out, newest first, with amounts, fees, purpose and \
                          whether a preimage proves it.",
            parameters: json!({
                "type": "object",
                "properties": {
                    "limit": {"type": "integer", "minimum": 1, "maximum": 100},
                    "direction": {"type": "string", "enum": ["in", "out"]}
                },
                "additionalProperties": false
            }),
            risk: Risk::Safe,
            read_only: true,
        }
    }

    async fn call(&self, ctx: &ToolContext, args: Value) -> Result<ToolOutput, ToolError> {
        let args: ListArgs = parse(args)?;
        let filter = ReceiptFilter {
            limit: Some(args.limit.unwrap_or(20)),
            direction: args.direction.as_deref().and_then(Direction::parse),
            status: None,
        };
        let list = receipts::list(&ctx.db, filter)
            .await
            .map_err(|e| ToolError::Respond(e.to_string()))?;
        let items: Vec<Value> = list
            .iter()
            .map(|r| {
                json!({
                    "direction": r.direction,
                    "rail": r.rail,
                    "amount_sats": r.amount_msat / 1000,
                    "fee_msat": r.fee_msat,
                    "status": r.status,
                    "purpose": r.purpose,
                    "payment_hash": r.payment_hash,
                    "proven": r.payment_proof().is_some(),
                    "created_at": r.created_at,
                })
            })
            .collect();
        json_output(json!({ "receipts": items }))
    }
}

pub struct CheckBudgetTool;

#[async_trait]
impl ToolHandler for CheckBudgetTool {
    fn def(&self) -> ToolDef {
        ToolDef {
            name: "check_budget",
            description: "Your spending limits (per payment, hourly, daily, reserve floor, approval threshold), what \
                          you spent in those windows, whether the wallet is frozen, and your survival tier.",
            parameters: json!({"type": "object", "properties": {}, "additionalProperties": false}),
            risk: Risk::Safe,
            read_only: true,
        }
    }

    async fn call(&self, ctx: &ToolContext, _args: Value) -> Result<ToolOutput, ToolError> {
        let w = wallet(ctx)?;
        let snapshot = w
            .budget()
            .snapshot()
            .await
            .map_err(|e| ToolError::Respond(e.to_string()))?;
        json_output(serde_json::to_value(snapshot).unwrap_or(Value::Null))
    }
}
