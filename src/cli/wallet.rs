//! `automaton wallet …`: the agent's Lightning wallet. Commands that need the node talk to the running agent over
//! the control socket (waiting up to 60 s for it); `receipts`, `verify-receipt`, `freeze` and `unfreeze` work on
//! the state DB, with or without a running agent.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use serde_json::{json, Value};

use super::ExitError;
use crate::control::{Client, ControlError};
use crate::home::Home;
use crate::money::receipts::{self, Receipt, ReceiptFilter};
use crate::state::{history, Db};

/// How long a command waits for the running agent (its node started and connected to the LSP).
const AGENT_WAIT: Duration = Duration::from_secs(60);

#[derive(Debug, Args)]
pub struct WalletArgs {
    #[command(subcommand)]
    command: WalletCommand,
}

#[derive(Debug, Subcommand)]
enum WalletCommand {
    /// Node id, npub, network, node state, LSP and channels
    Info(JsonFlag),
    /// Spendable balance: Lightning plus on-chain
    Balance(JsonFlag),
    /// A new on-chain address to fund the wallet
    Address(JsonFlag),
    /// An invoice to be paid (through a JIT channel from the LSP when no channel can receive it)
    Invoice(InvoiceArgs),
    /// Pay a BOLT 11 invoice (through the budget gate); waits until it succeeds or fails
    Pay(PayArgs),
    /// Send a keysend payment to a public or directly connected node
    Keysend(KeysendArgs),
    /// Send sats on-chain
    SendOnchain(OnchainArgs),
    /// The node's channels
    Channels(JsonFlag),
    /// Every payment in and out, newest first (works while the agent is stopped)
    Receipts(ReceiptsArgs),
    /// Check a receipt's signature against the agent's node key, and its proof of payment
    VerifyReceipt(VerifyArgs),
    /// Kill switch: refuse every payment until `unfreeze`
    Freeze(FreezeArgs),
    /// Lift the kill switch
    Unfreeze(JsonFlag),
}

#[derive(Debug, Args)]
struct JsonFlag {
    /// Print one JSON document on stdout
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct InvoiceArgs {
    /// Amount in sats
    sats: u64,
    /// Description shown to the payer
    #[arg(long)]
    memo: Option<String>,
    /// What the money is for (kept on the receipt)
    #[arg(long)]
    purpose: Option<String>,
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct PayArgs {
    /// The invoice (lnbc…, lntb…, lnbcrt…)
    bolt11: String,
    /// Most to pay in routing fees, in sats [default: wallet.max_fee_ppm of the amount]
    #[arg(long, value_name = "SATS")]
    max_fee: Option<u64>,
    /// Amount in sats, for an invoice without one
    #[arg(long, value_name = "SATS")]
    amount: Option<u64>,
    /// What the payment is for (kept on the receipt; default: the invoice's description)
    #[arg(long)]
    purpose: Option<String>,
    /// How long to wait for the creator when the payment needs approval
    #[arg(long, value_name = "SECS", default_value_t = 900)]
    approval_timeout: u64,
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct KeysendArgs {
    /// The recipient's node id
    node_id: String,
    /// Amount in sats
    sats: u64,
    #[arg(long, value_name = "SATS")]
    max_fee: Option<u64>,
    #[arg(long)]
    purpose: Option<String>,
    #[arg(long, value_name = "SECS", default_value_t = 900)]
    approval_timeout: u64,
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct OnchainArgs {
    /// Destination address
    address: String,
    /// Amount in sats
    sats: u64,
    /// Most to pay in transaction fees, in sats [default: wallet.onchain_max_fee_sats]
    #[arg(long, value_name = "SATS")]
    max_fee: Option<u64>,
    #[arg(long)]
    purpose: Option<String>,
    #[arg(long, value_name = "SECS", default_value_t = 900)]
    approval_timeout: u64,
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct ReceiptsArgs {
    /// Print a JSON array of receipts
    #[arg(long)]
    json: bool,
    /// How many (newest first)
    #[arg(long, default_value_t = 50, value_name = "N")]
    limit: u32,
    /// Only `in` or `out`
    #[arg(long, value_name = "in|out")]
    direction: Option<String>,
}

#[derive(Debug, Args)]
struct VerifyArgs {
    /// A receipt as printed by `wallet receipts --json` (one object, or an array of them)
    file: PathBuf,
    /// The node id that should have signed it [default: this agent's]
    #[arg(long, value_name = "HEX")]
    node_id: Option<String>,
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct FreezeArgs {
    /// Why (shown to the agent and in `budget show`)
    #[arg(long)]
    reason: Option<String>,
    #[arg(long)]
    json: bool,
}

pub fn execute(home: &Home, args: WalletArgs) -> anyhow::Result<()> {
    super::init_stderr_tracing();
    if !home.is_set_up() {
        return Err(super::not_set_up(home));
    }
    match args.command {
        WalletCommand::Info(a) => {
            let info = remote(home, "wallet.info", json!({}))?;
            print(a.json, &info, human_info)
        }
        WalletCommand::Balance(a) => {
            let balance = remote(home, "wallet.balance", json!({}))?;
            print(a.json, &balance, |b| {
                format!(
                    "{} sats spendable ({} on Lightning, {} on-chain); can receive {} sats over existing channels\n",
                    b["balance_sats"], b["spendable_lightning_sats"], b["spendable_onchain_sats"], b["inbound_sats"]
                )
            })
        }
        WalletCommand::Address(a) => {
            let address = remote(home, "wallet.address", json!({}))?;
            print(a.json, &address, |v| {
                format!("{}\n", v["address"].as_str().unwrap_or_default())
            })
        }
        WalletCommand::Invoice(a) => {
            let invoice = remote(
                home,
                "wallet.invoice",
                json!({"amount_sats": a.sats, "memo": a.memo, "purpose": a.purpose}),
            )?;
            if !a.json && invoice["jit_channel"] == true {
                eprintln!("(no channel can receive this yet: paying it opens a JIT channel from the LSP, whose fee is taken from the payment)");
            }
            print(a.json, &invoice, |v| {
                format!("{}\n", v["bolt11"].as_str().unwrap_or_default())
            })
        }
        WalletCommand::Pay(a) => {
            let paid = remote(
                home,
                "wallet.pay",
                json!({"bolt11": a.bolt11, "max_fee_sats": a.max_fee, "amount_sats": a.amount,
                       "purpose": a.purpose, "approval_wait_secs": a.approval_timeout}),
            )?;
            print(a.json, &paid, human_paid)
        }
        WalletCommand::Keysend(a) => {
            let paid = remote(
                home,
                "wallet.keysend",
                json!({"node_id": a.node_id, "amount_sats": a.sats, "max_fee_sats": a.max_fee,
                       "purpose": a.purpose, "approval_wait_secs": a.approval_timeout}),
            )?;
            print(a.json, &paid, human_paid)
        }
        WalletCommand::SendOnchain(a) => {
            let sent = remote(
                home,
                "wallet.send_onchain",
                json!({"address": a.address, "amount_sats": a.sats, "max_fee_sats": a.max_fee,
                       "purpose": a.purpose, "approval_wait_secs": a.approval_timeout}),
            )?;
            print(a.json, &sent, |v| {
                format!(
                    "sent {} sats on-chain in {} (fee {} sats)\n",
                    v["amount_sats"],
                    v["txid"].as_str().unwrap_or_default(),
                    v["fee_sats"]
                )
            })
        }
        WalletCommand::Channels(a) => {
            let channels = remote(home, "wallet.channels", json!({}))?;
            print(a.json, &channels, human_channels)
        }
        WalletCommand::Receipts(a) => receipts_command(home, a),
        WalletCommand::VerifyReceipt(a) => verify_command(home, a),
        WalletCommand::Freeze(a) => {
            let db = Db::open(&home.db_path())?;
            let changed = crate::money::freeze(&db, a.reason.as_deref())?;
            let value = json!({"frozen": true, "changed": changed});
            print(a.json, &value, |_| {
                if changed {
                    "the wallet is frozen: every payment is refused until `automaton wallet unfreeze`\n".into()
                } else {
                    "the wallet was already frozen\n".into()
                }
            })
        }
        WalletCommand::Unfreeze(a) => {
            let db = Db::open(&home.db_path())?;
            let changed = crate::money::unfreeze(&db)?;
            let value = json!({"frozen": false, "changed": changed});
            print(a.json, &value, |_| {
                if changed {
                    "the wallet is unfrozen\n".into()
                } else {
                    "the wallet was not frozen\n".into()
                }
            })
        }
    }
}

/// One request to the running agent; its refusal keeps the exit code it carries.
fn remote(home: &Home, method: &str, params: Value) -> anyhow::Result<Value> {
    let attempt = || -> Result<Value, ControlError> {
        let mut client = Client::connect(home, AGENT_WAIT)?;
        client.request(method, params)
    };
    attempt().map_err(|e| {
        ExitError {
            code: e.code,
            message: e.message,
        }
        .into()
    })
}

fn print(json: bool, value: &Value, human: impl Fn(&Value) -> String) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(value)?);
    } else {
        print!("{}", human(value));
    }
    Ok(())
}

fn human_info(v: &Value) -> String {
    let mut out = String::new();
    let mut line = |label: &str, value: String| out.push_str(&format!("{label:<10} {value}\n"));
    line("node id", v["node_id"].as_str().unwrap_or_default().into());
    line("npub", v["npub"].as_str().unwrap_or_default().into());
    line(
        "network",
        format!(
            "{} via {}",
            v["network"].as_str().unwrap_or_default(),
            v["esplora_url"].as_str().unwrap_or("no chain source")
        ),
    );
    let node = &v["node"];
    let state = match node["state"].as_str().unwrap_or_default() {
        "running" => format!(
            "running since {} (block {})",
            node["since"].as_str().unwrap_or_default(),
            v["best_block_height"]
        ),
        "starting" => match node["last_error"].as_str() {
            Some(error) => format!(
                "starting: attempt {} failed ({error}); retrying",
                node["attempts"]
            ),
            None => "starting".into(),
        },
        "failed" => format!("FAILED: {}", node["error"].as_str().unwrap_or_default()),
        other => other.to_string(),
    };
    line("node", state);
    if let Some(lsp) = v["lsp"].as_object() {
        line(
            "lsp",
            format!(
                "{}@{} ({})",
                lsp["node_id"].as_str().unwrap_or_default(),
                lsp["address"].as_str().unwrap_or_default(),
                if lsp["connected"] == true {
                    "connected"
                } else {
                    "not connected"
                }
            ),
        );
    }
    line(
        "channels",
        format!(
            "{} ({} usable), {} peers",
            v["channels"], v["usable_channels"], v["peers"]
        ),
    );
    if let Some(sync) = v["last_lightning_sync"].as_str() {
        line(
            "synced",
            format!(
                "{sync} (on-chain {})",
                v["last_onchain_sync"].as_str().unwrap_or("never")
            ),
        );
    }
    out
}

fn human_paid(v: &Value) -> String {
    format!(
        "paid {} sats + {} msat fee; payment hash {} (proof: preimage hashes to it); receipt {}\n",
        v["amount_msat"].as_u64().unwrap_or(0) / 1000,
        v["fee_msat"],
        v["payment_hash"].as_str().unwrap_or_default(),
        v["receipt_id"].as_str().unwrap_or_default()
    )
}

fn human_channels(v: &Value) -> String {
    let Some(channels) = v.as_array().filter(|c| !c.is_empty()) else {
        return "no channels yet (an invoice paid through the LSP opens one)\n".into();
    };
    let mut out = String::new();
    for c in channels {
        out.push_str(&format!(
            "{} with {}: {} sats, {} out / {} in (msat){}{}\n",
            c["channel_id"].as_str().unwrap_or_default(),
            c["counterparty_node_id"].as_str().unwrap_or_default(),
            c["capacity_sats"],
            c["outbound_msat"],
            c["inbound_msat"],
            if c["is_usable"] == true {
                ", usable"
            } else {
                ""
            },
            match c["confirmations"].as_u64() {
                Some(n) => format!(", {n} confirmations"),
                None => String::new(),
            }
        ));
    }
    out
}

fn receipts_command(home: &Home, args: ReceiptsArgs) -> anyhow::Result<()> {
    let direction = args
        .direction
        .as_deref()
        .map(|d| {
            receipts::Direction::parse(d)
                .ok_or_else(|| anyhow::anyhow!("--direction must be `in` or `out`, not `{d}`"))
        })
        .transpose()?;
    let db = Db::open(&home.db_path())?;
    let list = receipts::list_blocking(
        &db,
        &ReceiptFilter {
            limit: Some(args.limit),
            direction,
            status: None,
        },
    )?;
    if args.json {
        let values: Vec<Value> = list.iter().map(Receipt::to_json).collect();
        println!("{}", serde_json::to_string_pretty(&values)?);
        return Ok(());
    }
    if list.is_empty() {
        eprintln!("no receipts yet");
    }
    for r in &list {
        let arrow = match r.direction {
            receipts::Direction::In => "in ",
            receipts::Direction::Out => "out",
        };
        println!(
            "{}  {arrow} {:>10} sats{}  {:<9} {:<8} {}{}",
            r.created_at,
            r.amount_msat / 1000,
            if r.fee_msat > 0 {
                format!(" + {} msat fee", r.fee_msat)
            } else {
                String::new()
            },
            r.status.as_str(),
            r.rail.as_str(),
            r.purpose.as_deref().unwrap_or("-"),
            if r.payment_proof().is_some() {
                "  [proof]"
            } else {
                ""
            }
        );
        println!("    hash {}  receipt {}", r.payment_hash, r.id);
    }
    Ok(())
}

fn verify_command(home: &Home, args: VerifyArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.file)
        .with_context(|| format!("cannot read {}", args.file.display()))?;
    let value: Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not JSON", args.file.display()))?;
    let items = match value {
        Value::Array(items) => items,
        one => vec![one],
    };
    if items.is_empty() {
        anyhow::bail!("{} holds no receipt", args.file.display());
    }
    let node_id = match args.node_id {
        Some(id) => id,
        None => own_node_id(home)?,
    };
    let mut results = Vec::new();
    for item in items {
        let receipt = receipts::from_json(&item.to_string())?;
        results.push(crate::wallet::proof::verify(&receipt, &node_id));
    }
    let all_valid = results.iter().all(|r| r.is_valid());
    if args.json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    } else {
        for r in &results {
            if r.is_valid() {
                println!(
                    "receipt {}: valid — signed by {}{}",
                    r.receipt_id,
                    r.node_id,
                    if r.proof_of_payment {
                        ", preimage proves the payment"
                    } else {
                        ""
                    }
                );
            } else {
                println!(
                    "receipt {}: INVALID — {}",
                    r.receipt_id,
                    r.problems.join("; ")
                );
            }
        }
    }
    if all_valid {
        Ok(())
    } else {
        Err(ExitError {
            code: 1,
            message: "the receipt does not verify".into(),
        }
        .into())
    }
}

/// This agent's node id, as recorded at setup (or derived from `wallet.json`).
fn own_node_id(home: &Home) -> anyhow::Result<String> {
    if home.db_path().exists() {
        let db = Db::open(&home.db_path())?;
        if let Some(id) = db.call_blocking(|c| history::kv_get(c, crate::wallet::NODE_ID_KEY))? {
            return Ok(id);
        }
    }
    let identity = crate::wallet::Identity::load(&home.wallet_path())?;
    Ok(identity.node_id().to_string())
}
