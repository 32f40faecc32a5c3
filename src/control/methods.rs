//! The control socket's methods, in one match. Other parts of the runtime add theirs here.

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};

use super::{ControlError, Request};
use crate::config::Config;
use crate::home::Home;
use crate::money::BudgetPolicy;
use crate::state::Db;
use crate::wallet::spend::{self, ApprovalWait};
use crate::wallet::Wallet;

/// Longest a request may ask the agent to wait for its node.
const MAX_READY_WAIT: Duration = Duration::from_secs(300);

/// What the methods can reach: the running agent's parts.
pub struct ControlContext {
    pub home: Home,
    pub config: Arc<Config>,
    pub db: Db,
    pub budget: BudgetPolicy,
    /// `None` for a home without `wallet.json` (set up before wallets existed).
    pub wallet: Option<Wallet>,
}

/// Runs one request.
pub async fn dispatch(ctx: &ControlContext, request: Request) -> Result<Value, ControlError> {
    let params = request.params;
    match request.method.as_str() {
        "ping" => Ok(json!({
            "name": ctx.config.name,
            "pid": std::process::id(),
            "home": ctx.home.root().display().to_string(),
        })),
        "wallet.info" => Ok(to_value(wallet(ctx)?.info())),
        "wallet.balance" => {
            let w = ready_wallet(ctx, &params).await?;
            Ok(to_value(w.balance()?))
        }
        "wallet.address" => {
            let w = ready_wallet(ctx, &params).await?;
            Ok(json!({ "address": w.new_address().await? }))
        }
        "wallet.channels" => {
            let w = ready_wallet(ctx, &params).await?;
            Ok(to_value(w.channels()?))
        }
        "wallet.invoice" => {
            let p: InvoiceParams = parse(params.clone())?;
            let amount_msat = amount_msat(p.amount_sats, p.amount_msat)?;
            let w = ready_wallet(ctx, &params).await?;
            let invoice = w
                .create_invoice(amount_msat, p.memo.as_deref(), p.purpose.as_deref())
                .await?;
            Ok(to_value(invoice))
        }
        "wallet.pay" => {
            let p: PayParams = parse(params.clone())?;
            let w = ready_wallet(ctx, &params).await?;
            let amount = match (p.amount_sats, p.amount_msat) {
                (None, None) => None,
                (sats, msat) => Some(amount_msat(sats, msat)?),
            };
            let paid = spend::pay_invoice(
                w,
                &p.bolt11,
                amount,
                p.max_fee_sats.map(|s| s.saturating_mul(1000)),
                p.purpose.as_deref().unwrap_or(""),
                approval_wait(p.approval_wait_secs),
            )
            .await?;
            Ok(to_value(paid))
        }
        "wallet.keysend" => {
            let p: KeysendParams = parse(params.clone())?;
            let amount = amount_msat(p.amount_sats, p.amount_msat)?;
            let w = ready_wallet(ctx, &params).await?;
            let paid = spend::keysend(
                w,
                &p.node_id,
                amount,
                p.max_fee_sats.map(|s| s.saturating_mul(1000)),
                p.purpose.as_deref().unwrap_or(""),
                approval_wait(p.approval_wait_secs),
            )
            .await?;
            Ok(to_value(paid))
        }
        "wallet.send_onchain" => {
            let p: OnchainParams = parse(params.clone())?;
            if p.amount_sats == 0 {
                return Err(ControlError::bad_request(
                    "the amount must be at least 1 sat",
                ));
            }
            let w = ready_wallet(ctx, &params).await?;
            let sent = spend::send_onchain(
                w,
                &p.address,
                p.amount_sats,
                p.max_fee_sats,
                p.purpose.as_deref().unwrap_or(""),
                approval_wait(p.approval_wait_secs),
            )
            .await?;
            Ok(to_value(sent))
        }
        "l402.fetch" => {
            let p: L402FetchParams = parse(params.clone())?;
            let w = ready_wallet(ctx, &params).await?;
            let client = crate::l402::client::L402Client::new(w.clone())
                .map_err(|e| ControlError::new(e.exit_code(), e.to_string()).with_kind(e.kind()))?;
            let mut headers = Vec::new();
            for line in p.headers.unwrap_or_default() {
                let (name, value) = line.split_once(':').ok_or_else(|| {
                    ControlError::bad_request(format!("header `{line}` is not `Name: value`"))
                })?;
                headers.push((name.trim().to_string(), value.trim().to_string()));
            }
            let request = crate::l402::client::FetchRequest {
                url: p.url,
                method: p.method.unwrap_or_else(|| {
                    if p.data.is_some() {
                        "POST".into()
                    } else {
                        "GET".into()
                    }
                }),
                headers,
                body: p.data.map(String::into_bytes),
                max_sats: p.max_sats.unwrap_or(crate::l402::client::DEFAULT_MAX_SATS),
                purpose: p.purpose,
                timeout: p.timeout_secs.map(Duration::from_secs),
            };
            let response = client
                .fetch(request)
                .await
                .map_err(|e| ControlError::new(e.exit_code(), e.to_string()).with_kind(e.kind()))?;
            let mut result = response.summary();
            result["content_type"] = json!(response.content_type());
            result["receipt_id"] = json!(response.receipt_id);
            Ok(result)
        }
        other => Err(ControlError::bad_request(format!(
            "unknown method `{other}`"
        ))),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InvoiceParams {
    amount_sats: Option<u64>,
    amount_msat: Option<u64>,
    memo: Option<String>,
    purpose: Option<String>,
    #[serde(default)]
    #[allow(dead_code)]
    wait_secs: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PayParams {
    bolt11: String,
    amount_sats: Option<u64>,
    amount_msat: Option<u64>,
    max_fee_sats: Option<u64>,
    purpose: Option<String>,
    approval_wait_secs: Option<u64>,
    #[serde(default)]
    #[allow(dead_code)]
    wait_secs: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysendParams {
    node_id: String,
    amount_sats: Option<u64>,
    amount_msat: Option<u64>,
    max_fee_sats: Option<u64>,
    purpose: Option<String>,
    approval_wait_secs: Option<u64>,
    #[serde(default)]
    #[allow(dead_code)]
    wait_secs: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OnchainParams {
    address: String,
    amount_sats: u64,
    max_fee_sats: Option<u64>,
    purpose: Option<String>,
    approval_wait_secs: Option<u64>,
    #[serde(default)]
    #[allow(dead_code)]
    wait_secs: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct L402FetchParams {
    url: String,
    method: Option<String>,
    /// `Name: value` lines.
    headers: Option<Vec<String>>,
    data: Option<String>,
    max_sats: Option<u64>,
    purpose: Option<String>,
    timeout_secs: Option<u64>,
    #[serde(default)]
    #[allow(dead_code)]
    wait_secs: Option<u64>,
}

fn parse<T: serde::de::DeserializeOwned>(params: Value) -> Result<T, ControlError> {
    serde_json::from_value(params)
        .map_err(|e| ControlError::bad_request(format!("invalid parameters: {e}")))
}

fn to_value<T: serde::Serialize>(value: T) -> Value {
    serde_json::to_value(value).unwrap_or(Value::Null)
}

fn amount_msat(sats: Option<u64>, msat: Option<u64>) -> Result<u64, ControlError> {
    let amount = match (sats, msat) {
        (Some(_), Some(_)) => {
            return Err(ControlError::bad_request(
                "give amount_sats or amount_msat, not both",
            ))
        }
        (Some(s), None) => s.checked_mul(1000),
        (None, Some(m)) => Some(m),
        (None, None) => return Err(ControlError::bad_request("an amount is required")),
    };
    match amount {
        Some(a) if a > 0 => Ok(a),
        Some(_) => Err(ControlError::bad_request("the amount must be above 0")),
        None => Err(ControlError::bad_request("the amount is too large")),
    }
}

fn approval_wait(secs: Option<u64>) -> ApprovalWait {
    ApprovalWait(secs.filter(|s| *s > 0).map(Duration::from_secs))
}

fn wallet(ctx: &ControlContext) -> Result<&Wallet, ControlError> {
    ctx.wallet.as_ref().ok_or_else(|| {
        ControlError::new(
            1,
            format!(
                "this agent has no wallet ({} is missing); `automaton setup --reconfigure` creates one",
                ctx.home.wallet_path().display()
            ),
        )
        .with_kind("no_wallet")
    })
}

/// The wallet once its node runs (and reaches its LSP), waiting as long as the caller said it would.
async fn ready_wallet<'a>(
    ctx: &'a ControlContext,
    params: &Value,
) -> Result<&'a Wallet, ControlError> {
    let w = wallet(ctx)?;
    let wait = params
        .get("wait_secs")
        .and_then(Value::as_u64)
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(60))
        .min(MAX_READY_WAIT);
    w.wait_ready(wait).await?;
    Ok(w)
}
