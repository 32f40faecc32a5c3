//! `automaton nwc create|list|revoke`: the agent's Nostr Wallet Connect (NIP-47) connections. Each is a client
//! key with its own methods and budget; the running agent answers its requests. These commands only touch the
//! state DB, so they work while the agent is stopped. The connection URI (it holds the client secret) is printed
//! once, at creation, and stored nowhere.

use clap::{Args, Subcommand};
use serde_json::json;

use super::card::nostr_context;
use crate::config::Override;
use crate::home::Home;
use crate::nostr::nwc::{self, NewConnection, NwcConnection, Period, SUPPORTED_METHODS};
use crate::state::Db;

#[derive(Debug, Args)]
pub struct NwcArgs {
    #[command(subcommand)]
    command: NwcCommand,
}

#[derive(Debug, Subcommand)]
enum NwcCommand {
    /// Create a connection and print its nostr+walletconnect:// URI (shown only now: keep it secret)
    Create(CreateArgs),
    /// The connections: name, methods, budget and what was spent in the current period (no secrets)
    List(ListArgs),
    /// Revoke a connection (by id, or by name): its requests are refused from now on
    Revoke(RevokeArgs),
}

#[derive(Debug, Args)]
struct CreateArgs {
    /// Most the connection may spend per period, in sats (fees included)
    #[arg(long, value_name = "N")]
    budget_sats: u64,
    /// When the budget starts afresh (calendar periods, UTC)
    #[arg(long, value_enum, default_value = "monthly")]
    period: Period,
    /// Methods the connection may call, comma-separated [default: all of get_info, get_balance, pay_invoice,
    /// make_invoice, lookup_invoice, list_transactions]
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    methods: Vec<String>,
    /// A name for the connection (kept on receipts as purpose `nwc:<name>`)
    #[arg(long)]
    name: Option<String>,
    /// Print one JSON document on stdout (it holds the URI)
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct ListArgs {
    /// Print one JSON array on stdout
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct RevokeArgs {
    /// The connection's id (or its name)
    id: String,
    /// Print the revoked connection as JSON on stdout
    #[arg(long)]
    json: bool,
}

pub fn execute(home: &Home, overrides: &[Override], args: NwcArgs) -> anyhow::Result<()> {
    super::init_stderr_tracing();
    if !home.is_set_up() {
        return Err(super::not_set_up(home));
    }
    match args.command {
        NwcCommand::Create(args) => create(home, overrides, args),
        NwcCommand::List(args) => {
            let db = Db::open(&home.db_path())?;
            list(&nwc::list(&db)?, args.json)
        }
        NwcCommand::Revoke(args) => {
            let db = Db::open(&home.db_path())?;
            let revoked = nwc::revoke(&db, &args.id)?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&view(&revoked))?);
            } else {
                println!("revoked {} ({})", revoked.id, revoked.name);
            }
            Ok(())
        }
    }
}

fn create(home: &Home, overrides: &[Override], args: CreateArgs) -> anyhow::Result<()> {
    let ctx = nostr_context(home, overrides)?;
    let created = nwc::create(
        &ctx.db,
        &ctx.keys.public_key(),
        &ctx.relays,
        NewConnection {
            name: args.name,
            budget_sats: args.budget_sats,
            period: args.period,
            methods: args.methods,
        },
    )?;
    let uri = created.uri.to_string();
    let c = &created.connection;
    if args.json {
        let mut doc = view(c);
        doc["uri"] = json!(uri);
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        println!("{uri}");
        eprintln!(
            "connection {} ({}): {} sats {}, methods {}",
            c.id,
            c.name,
            c.budget_sats,
            c.period.as_str(),
            c.methods.join(" ")
        );
        eprintln!(
            "this URI holds the connection's secret and is not shown again; the running agent answers it \
             (`automaton nwc revoke {}` to cut it off)",
            c.id
        );
    }
    Ok(())
}

fn view(c: &NwcConnection) -> serde_json::Value {
    json!({
        "id": c.id,
        "name": c.name,
        "active": c.is_active(),
        "client_pubkey": c.client_pubkey,
        "service_pubkey": c.service_pubkey,
        "relays": c.relays,
        "methods": c.methods,
        "budget_sats": c.budget_sats,
        "period": c.period,
        "spent_sats": c.spent_msat.div_ceil(1000),
        "created_at": c.created_at,
        "revoked_at": c.revoked_at,
    })
}

fn list(connections: &[NwcConnection], as_json: bool) -> anyhow::Result<()> {
    if as_json {
        let docs: Vec<_> = connections.iter().map(view).collect();
        println!("{}", serde_json::to_string_pretty(&docs)?);
        return Ok(());
    }
    if connections.is_empty() {
        eprintln!(
            "no NWC connections (`automaton nwc create --budget-sats N` makes one; methods: {})",
            SUPPORTED_METHODS.map(|m| m.as_str().to_string()).join(" ")
        );
        return Ok(());
    }
    println!(
        "{:<26}  {:<16}  {:<8}  {:>14}  {:<8}  METHODS",
        "ID", "NAME", "STATE", "SPENT/BUDGET", "PERIOD"
    );
    for c in connections {
        println!(
            "{:<26}  {:<16}  {:<8}  {:>14}  {:<8}  {}",
            c.id,
            c.name,
            if c.is_active() { "active" } else { "revoked" },
            format!("{}/{}", c.spent_msat.div_ceil(1000), c.budget_sats),
            c.period.as_str(),
            c.methods.join(" ")
        );
    }
    Ok(())
}
