//! `automaton l402 …`: buy HTTP calls over Lightning. `fetch` goes through the running agent (its node pays); the
//! token cache is the agent's state DB, so the CLI and the agent's `l402_fetch` tool share credentials.
//! `tokens` lists the cached credentials (never their secrets) and works while the agent is stopped.

use std::io::Write;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::{json, Value};

use super::ExitError;
use crate::control::{Client, ControlError};
use crate::home::Home;
use crate::state::Db;

/// How long `fetch` waits for the running agent (its node started and connected to the LSP).
const AGENT_WAIT: Duration = Duration::from_secs(60);

#[derive(Debug, Args)]
pub struct L402Args {
    #[command(subcommand)]
    command: L402Command,
}

#[derive(Debug, Subcommand)]
enum L402Command {
    /// Fetch a URL, paying its L402 challenge (within --max-sats and the budget) and caching the credential
    Fetch(FetchArgs),
    /// The cached L402 credentials: origin, path, price, expiry
    Tokens(TokensArgs),
    /// Drop cached credentials: those covering URL, or --all (the next fetch buys anew)
    Forget(ForgetArgs),
    /// The tokens this agent sold for its own paid services (`http.services`): service, price, uses
    Sold(SoldArgs),
    /// Revoke a sold token (by token id, payment hash or root key id): its holder gets a fresh 402
    Revoke(RevokeArgs),
}

#[derive(Debug, Args)]
struct SoldArgs {
    /// Also list challenges not paid (yet)
    #[arg(long)]
    all: bool,
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct RevokeArgs {
    /// Token id, payment hash or root key id (64 hex digits, as `l402 sold` shows)
    id: String,
}

#[derive(Debug, Args)]
struct ForgetArgs {
    /// Drop the credentials of this URL's origin that cover its path
    #[arg(required_unless_present = "all")]
    url: Option<String>,
    /// Drop every cached credential
    #[arg(long, conflicts_with = "url")]
    all: bool,
}

#[derive(Debug, Args)]
struct FetchArgs {
    /// The URL to fetch
    url: String,
    /// HTTP method [default: GET, or POST with --data]
    #[arg(short = 'X', long)]
    method: Option<String>,
    /// Request body (`@FILE` reads it from a file)
    #[arg(short = 'd', long)]
    data: Option<String>,
    /// A request header `Name: value` (repeatable)
    #[arg(short = 'H', long = "header", value_name = "NAME: VALUE")]
    headers: Vec<String>,
    /// The most to pay for the credential, in sats; a dearer challenge is refused (exit 2) and nothing is paid
    #[arg(long, value_name = "N", default_value_t = crate::l402::client::DEFAULT_MAX_SATS)]
    max_sats: u64,
    /// What the call is for (kept on the receipt)
    #[arg(long)]
    purpose: Option<String>,
    /// Seconds to wait for the server
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    timeout: u64,
    /// Print {status, paid_msat, fee_msat, payment_hash, from_cache, body} on stdout
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct TokensArgs {
    #[arg(long)]
    json: bool,
}

pub fn execute(home: &Home, args: L402Args) -> anyhow::Result<()> {
    super::init_stderr_tracing();
    if !home.is_set_up() {
        return Err(super::not_set_up(home));
    }
    match args.command {
        L402Command::Fetch(args) => fetch(home, args),
        L402Command::Tokens(args) => tokens(home, args),
        L402Command::Sold(args) => sold(home, args),
        L402Command::Revoke(args) => revoke(home, args),
        L402Command::Forget(args) => {
            let db = Db::open(&home.db_path())?;
            let dropped = crate::l402::client::forget_tokens(&db, args.url.as_deref())?;
            eprintln!("dropped {dropped} cached credential(s)");
            Ok(())
        }
    }
}

fn fetch(home: &Home, args: FetchArgs) -> anyhow::Result<()> {
    let data = match args.data {
        Some(d) if d.starts_with('@') => Some(
            std::fs::read_to_string(&d[1..])
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", &d[1..]))?,
        ),
        other => other,
    };
    for header in &args.headers {
        if !header.contains(':') {
            anyhow::bail!("--header `{header}` is not `Name: value`");
        }
    }
    let params = json!({
        "url": args.url,
        "method": args.method,
        "headers": args.headers,
        "data": data,
        "max_sats": args.max_sats,
        "purpose": args.purpose,
        "timeout_secs": args.timeout,
    });
    let result = (|| -> Result<Value, ControlError> {
        let mut client = Client::connect(home, AGENT_WAIT)?;
        client.request("l402.fetch", params)
    })()
    .map_err(|e| ExitError {
        code: e.code,
        message: e.message,
    })?;
    if args.json {
        let shape = json!({
            "status": result["status"],
            "paid_msat": result["paid_msat"],
            "fee_msat": result["fee_msat"],
            "payment_hash": result["payment_hash"],
            "from_cache": result["from_cache"],
            "body": result["body"],
        });
        println!("{}", serde_json::to_string_pretty(&shape)?);
        return Ok(());
    }
    let paid = result["paid_msat"].as_u64().unwrap_or(0);
    let note = if paid > 0 {
        format!(
            "HTTP {} · paid {} sats (+{} msat fee), payment hash {}",
            result["status"],
            paid / 1000,
            result["fee_msat"].as_u64().unwrap_or(0),
            result["payment_hash"].as_str().unwrap_or_default()
        )
    } else if result["from_cache"].as_bool() == Some(true) {
        format!(
            "HTTP {} · cached credential, nothing paid",
            result["status"]
        )
    } else {
        format!("HTTP {} · nothing paid", result["status"])
    };
    eprintln!("{note}");
    let mut out = std::io::stdout().lock();
    match &result["body"] {
        Value::String(text) => out.write_all(text.as_bytes())?,
        other => writeln!(out, "{}", serde_json::to_string_pretty(other)?)?,
    }
    out.flush()?;
    let status = result["status"].as_u64().unwrap_or(0);
    if status >= 400 {
        return Err(ExitError {
            code: 1,
            message: format!("the server answered HTTP {status}"),
        }
        .into());
    }
    Ok(())
}

fn tokens(home: &Home, args: TokensArgs) -> anyhow::Result<()> {
    let db = Db::open(&home.db_path())?;
    let tokens = crate::l402::client::list_tokens(&db)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&tokens)?);
        return Ok(());
    }
    if tokens.is_empty() {
        println!("no cached L402 credentials");
        return Ok(());
    }
    for t in tokens {
        let expiry = t
            .valid_until
            .and_then(|v| chrono::DateTime::from_timestamp(v, 0))
            .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
            .unwrap_or_else(|| "no expiry".into());
        println!(
            "{}{}  {} sats  until {}  bought {}",
            t.origin,
            t.path_prefix,
            t.amount_msat / 1000,
            expiry,
            t.created_at
        );
    }
    Ok(())
}

/// Runs one async state-DB call from a synchronous command.
fn block_on<F: std::future::Future>(future: F) -> anyhow::Result<F::Output> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(future))
}

fn sold(home: &Home, args: SoldArgs) -> anyhow::Result<()> {
    let db = Db::open(&home.db_path())?;
    let tokens = block_on(crate::l402::server::sold(&db, args.all))??;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&tokens)?);
        return Ok(());
    }
    if tokens.is_empty() {
        eprintln!("no tokens sold yet");
        return Ok(());
    }
    for t in tokens {
        let until = t
            .valid_until
            .and_then(|v| chrono::DateTime::from_timestamp(v as i64, 0))
            .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
            .unwrap_or_else(|| "no expiry".into());
        println!(
            "{}  {}  {} sats  {}  {} uses  until {}",
            t.token_id,
            t.service,
            t.price_msat / 1000,
            if t.paid { "paid" } else { "unpaid" },
            t.uses,
            until
        );
    }
    Ok(())
}

fn revoke(home: &Home, args: RevokeArgs) -> anyhow::Result<()> {
    let db = Db::open(&home.db_path())?;
    match block_on(crate::l402::server::revoke(&db, &args.id))? {
        Ok(n) => {
            println!("revoked {n} token(s): their holders get a fresh 402");
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}
