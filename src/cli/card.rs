//! `automaton card show|publish`: the agent's NIP-89 card as it reads now, and publishing it to the relays
//! (returns once a relay accepted it; relays that did not stay queued in the outbox for the running agent).

use anyhow::Context;
use clap::{Args, Subcommand};
use serde_json::json;

use crate::config::{env_overrides, Config, ConfigError, Override};
use crate::home::Home;
use crate::nostr::outbox::{self, Purpose};
use crate::nostr::presence::{publish_now, signed_card};
use crate::nostr::{self, RelaySet};
use crate::state::Db;

#[derive(Debug, Args)]
pub struct CardArgs {
    #[command(subcommand)]
    command: CardCommand,
}

#[derive(Debug, Subcommand)]
enum CardCommand {
    /// Show the card as it would be published now, and where the last one went
    Show(JsonFlag),
    /// Sign the card and publish it; prints the event id once a relay accepted it
    Publish(JsonFlag),
}

#[derive(Debug, Args)]
struct JsonFlag {
    /// Print one JSON document on stdout
    #[arg(long)]
    json: bool,
}

/// What Nostr commands need: config, state DB, keys, relays.
pub(crate) struct NostrContext {
    pub config: Config,
    pub db: Db,
    pub keys: nostr::Keys,
    pub relays: RelaySet,
}

pub(crate) fn nostr_context(home: &Home, overrides: &[Override]) -> anyhow::Result<NostrContext> {
    if !home.is_set_up() {
        return Err(super::not_set_up(home));
    }
    let config = match Config::load_with(home, &env_overrides(), overrides) {
        Ok(config) => config,
        Err(ConfigError::NotFound { .. }) => return Err(super::not_set_up(home)),
        Err(err) => return Err(err.into()),
    };
    let db = Db::open(&home.db_path())?;
    let keys = nostr::agent_keys(home)?;
    let relays = RelaySet::from_config(&config)?;
    Ok(NostrContext {
        config,
        db,
        keys,
        relays,
    })
}

pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

pub fn execute(home: &Home, overrides: &[Override], args: CardArgs) -> anyhow::Result<()> {
    super::init_stderr_tracing();
    let ctx = nostr_context(home, overrides)?;
    let rt = runtime()?;
    match args.command {
        CardCommand::Show(flag) => rt.block_on(show(&ctx, flag.json)),
        CardCommand::Publish(flag) => rt.block_on(publish(&ctx, flag.json)),
    }
}

async fn show(ctx: &NostrContext, json_out: bool) -> anyhow::Result<()> {
    let (content, event) = signed_card(&ctx.db, &ctx.keys, &ctx.config).await?;
    let last = outbox::latest_event(&ctx.db, Purpose::Card).await?;
    let rows = outbox::entries(&ctx.db, Some(Purpose::Card)).await?;
    let last_json = last.as_ref().map(|e| {
        let id = e.id.to_hex();
        let relays: Vec<_> = rows
            .iter()
            .filter(|r| r.event_id == id)
            .map(|r| {
                json!({"relay": r.relay, "sent_at": r.sent_at, "attempts": r.attempts, "last_error": r.last_error})
            })
            .collect();
        json!({"event_id": id, "created_at": e.created_at.as_secs(), "relays": relays})
    });
    let npub = nostr::npub(&ctx.keys.public_key());
    if json_out {
        let tags: Vec<Vec<String>> = event.tags.iter().map(|t| t.clone().to_vec()).collect();
        let doc = json!({
            "npub": npub,
            "pubkey": ctx.keys.public_key().to_hex(),
            "kind": nostr::CARD_KIND,
            "content": content,
            "tags": tags,
            "relays": ctx.relays.strings(),
            "last_published": last_json,
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(());
    }
    println!("{} ({})", content.name, npub);
    println!("  status     {}", content.status);
    if let Some(tier) = &content.tier {
        println!("  tier       {tier}");
    }
    println!(
        "  node id    {}",
        content
            .ln_node_pubkey
            .as_deref()
            .unwrap_or("(no wallet yet)")
    );
    println!(
        "  pay to     {}",
        content
            .lud16
            .as_deref()
            .unwrap_or("(no Lightning address: set http.public_url)")
    );
    if content.services.is_empty() {
        println!("  services   none");
    }
    for s in &content.services {
        let price = s
            .price_msat
            .map(|m| format!("{} sats", m.div_ceil(1000)))
            .unwrap_or_default();
        println!("  service    {} {price}", s.id);
    }
    if ctx.relays.is_empty() {
        println!("  relays     none configured (nostr.relays)");
    } else {
        println!("  relays     {}", ctx.relays.strings().join(", "));
    }
    match last {
        None => println!("  published  never"),
        Some(e) => {
            let sent = rows
                .iter()
                .filter(|r| r.event_id == e.id.to_hex() && r.sent_at.is_some())
                .count();
            println!(
                "  published  {} at {} (accepted by {sent} relay{})",
                e.id,
                e.created_at.to_human_datetime(),
                if sent == 1 { "" } else { "s" }
            );
        }
    }
    Ok(())
}

async fn publish(ctx: &NostrContext, json_out: bool) -> anyhow::Result<()> {
    ctx.relays.require()?;
    let (content, event) = signed_card(&ctx.db, &ctx.keys, &ctx.config).await?;
    let published = publish_now(&ctx.db, &ctx.keys, &ctx.relays, &event, Purpose::Card).await?;
    for (relay, why) in &published.failed {
        eprintln!("warning: {relay} did not take the card ({why}); the running agent retries it");
    }
    if json_out {
        let doc = json!({
            "event_id": published.event_id,
            "npub": nostr::npub(&ctx.keys.public_key()),
            "status": content.status,
            "accepted": published.accepted,
            "failed": published.failed.iter().map(|(r, w)| json!({"relay": r, "error": w})).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        println!("{}", published.event_id);
        eprintln!("card accepted by {}", published.accepted.join(", "));
    }
    Ok(())
}
