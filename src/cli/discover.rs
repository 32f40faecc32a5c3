//! `automaton discover`: other agents' cards on the configured relays (verified, newest per agent), or one
//! agent's `/.well-known/automaton.json` with `--url`.

use std::time::Duration;

use clap::Args;
use serde_json::json;

use crate::config::Override;
use crate::home::Home;
use crate::nostr::discover::{self, Query};

#[derive(Debug, Args)]
pub struct DiscoverArgs {
    /// Only agents offering this service (matches a service id or description, or a NIP-90 job kind)
    #[arg(long, value_name = "X")]
    service: Option<String>,
    /// Describe the agent at this URL (its /.well-known/automaton.json) instead of asking relays
    #[arg(long, value_name = "URL", conflicts_with = "service")]
    url: Option<String>,
    /// Also list agents whose newest card is stale (older than twice the publish interval)
    #[arg(long)]
    all: bool,
    /// How long to wait for relays (or the URL)
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    timeout: u64,
    /// Print one JSON document on stdout
    #[arg(long)]
    json: bool,
}

pub fn execute(home: &Home, overrides: &[Override], args: DiscoverArgs) -> anyhow::Result<()> {
    super::init_stderr_tracing();
    let timeout = Duration::from_secs(args.timeout.max(1));
    let rt = super::card::runtime()?;
    if let Some(url) = &args.url {
        // Describing a URL needs no agent of our own.
        let description = rt.block_on(discover::fetch_description(url, timeout))?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&description)?);
        } else {
            println!(
                "{} ({})",
                description.name.as_deref().unwrap_or("(unnamed)"),
                description.url
            );
            for (label, value) in [
                ("status", &description.status),
                ("tier", &description.tier),
                ("node id", &description.node_id),
                ("npub", &description.npub),
                ("pay to", &description.lightning_address),
            ] {
                if let Some(v) = value {
                    println!("  {label:<9} {v}");
                }
            }
            for s in &description.services {
                println!(
                    "  service   {} {} {}",
                    s.name,
                    s.path.as_deref().unwrap_or(""),
                    s.price_sats
                        .map(|p| format!("{p} sats"))
                        .unwrap_or_default()
                );
            }
        }
        return Ok(());
    }
    let ctx = super::card::nostr_context(home, overrides)?;
    let query = Query {
        service: args.service.clone(),
        include_stale: args.all,
        stale_after_secs: ctx.config.nostr.card_interval_secs.saturating_mul(2),
        exclude_pubkey: Some(ctx.keys.public_key().to_hex()),
    };
    let found = rt.block_on(discover::discover_on(
        &ctx.keys,
        &ctx.relays,
        &ctx.db,
        &query,
        timeout,
    ))?;
    if found.from_cache {
        eprintln!("warning: no relay answered; these are cards seen earlier");
    }
    if !found.ignored.is_empty() {
        eprintln!(
            "ignored {} invalid card{} (bad signature or malformed)",
            found.ignored.len(),
            if found.ignored.len() == 1 { "" } else { "s" }
        );
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&json!(found.agents))?);
        return Ok(());
    }
    if found.agents.is_empty() {
        eprintln!("no agents found");
        return Ok(());
    }
    for card in &found.agents {
        println!(
            "{} [{}] {}",
            card.name,
            card.status.map(|s| s.as_str()).unwrap_or("unknown"),
            card.npub
        );
        if let Some(about) = &card.about {
            println!("  {about}");
        }
        if let Some(node) = &card.ln_node_pubkey {
            println!("  node id   {node}");
        }
        if let Some(address) = &card.lud16 {
            println!("  pay to    {address}");
        }
        for s in &card.services {
            let price = s
                .price_msat
                .map(|m| format!("{} sats", m.div_ceil(1000)))
                .unwrap_or_default();
            println!(
                "  service   {} {} {price}",
                s.id,
                s.url.as_deref().unwrap_or("")
            );
        }
    }
    Ok(())
}
