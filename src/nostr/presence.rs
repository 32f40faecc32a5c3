//! The agent's live presence while `automaton run` holds the home: its card published at start and whenever
//! its status changes (and at least every `nostr.card_interval_secs`), distress notes on entering `critical`
//! or `dead`, and the outbox flushed as relays come and go. Also the pieces the CLI, tools and heartbeat tasks
//! share: who the agent is (for its card), building the current card, and publishing one event right now.

use std::time::Duration;

use ::nostr::{Event, Keys, RelayUrl, Timestamp};
use rusqlite::Connection;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::card::{card_event, CardContent, CardService, CardStatus, VERSION};
use super::outbox::{self, Purpose};
use super::relays::{self, RelaySet};
use super::{distress, NostrError};
use crate::config::Config;
use crate::home::Home;
use crate::money::tiers;
use crate::state::history::kv_get;
use crate::state::Db;

/// How often the live presence looks at the agent's status and the outbox.
const TICK: Duration = Duration::from_secs(2);
/// How long a one-off publish (CLI, tool) waits for relays to connect before sending.
const CONNECT_WAIT: Duration = Duration::from_secs(5);
/// How long shutdown spends on a last flush.
const FINAL_FLUSH: Duration = Duration::from_secs(3);

/// Where the wallet records the node id at setup (`wallet::NODE_ID_KEY`), so the card needs no running node.
const NODE_ID_KEY: &str = "wallet.node_id";

/// The facts a card and a distress note are made of.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Identity {
    pub name: String,
    /// The Lightning node id (recorded by the wallet at setup).
    pub node_id: Option<String>,
    pub node_addr: Option<String>,
    /// `name@host[:port]` of the agent's HTTP face (`http.public_url`).
    pub lightning_address: Option<String>,
    /// The LNURL-pay endpoint behind the Lightning address.
    pub lnurlp: Option<String>,
    /// `/.well-known/automaton.json`.
    pub web: Option<String>,
}

impl Identity {
    pub fn read(config: &Config, conn: &Connection) -> rusqlite::Result<Identity> {
        let (lightning_address, lnurlp, web) = http_face(config);
        Ok(Identity {
            name: config.name.clone(),
            node_id: kv_get(conn, NODE_ID_KEY)?,
            node_addr: None,
            lightning_address,
            lnurlp,
            web,
        })
    }
}

/// The Lightning address, LNURL-pay URL and description URL the HTTP face advertises (`http.public_url`), so the
/// card names exactly what the face serves. No address when the URL cannot serve LNURL (plain http off loopback).
pub fn http_face(config: &Config) -> (Option<String>, Option<String>, Option<String>) {
    let advertised = crate::http::Advertised::from_config(config, None);
    if config.http.public_url.is_none() && config.http.listen.is_none() {
        return (None, None, None);
    }
    let lnurlp = advertised.lightning_address.as_ref().map(|_| {
        format!(
            "{}/.well-known/lnurlp/{}",
            advertised.public_url, advertised.name
        )
    });
    let web = format!("{}/.well-known/automaton.json", advertised.public_url);
    (advertised.lightning_address, lnurlp, Some(web))
}

/// The paid services of `http.services` as the card lists them: where to call them, that they take L402, and
/// what one call costs. None when the face has no address to be reached at.
pub fn card_services(config: &Config) -> Vec<CardService> {
    if config.http.public_url.is_none() && config.http.listen.is_none() {
        return Vec::new();
    }
    let base = crate::http::Advertised::from_config(config, None).public_url;
    config
        .http
        .services
        .iter()
        .map(|s| CardService {
            id: s.name.clone(),
            kind: s.job_kind,
            url: Some(format!("{base}{}", s.path)),
            auth: Some("l402".to_string()),
            price_msat: Some(s.price_sats.saturating_mul(1000)),
            unit: Some("request".to_string()),
            description: (!s.description.is_empty()).then(|| s.description.clone()),
        })
        .collect()
}

/// The card as it should read now: config, recorded identity, survival tier.
pub fn current_card(config: &Config, conn: &Connection) -> rusqlite::Result<CardContent> {
    let identity = Identity::read(config, conn)?;
    let tier = kv_get(conn, tiers::TIER_KEY)?;
    // A card replaces the last one only with a later `created_at` (NIP-01: on a tie relays keep the lower id), so
    // a card made within the same second as the previous one (a restart, a quick status change) goes one later.
    let last_card_at: Option<u64> = {
        use rusqlite::OptionalExtension;
        conn.query_row(
            "SELECT event_json FROM nostr_outbox WHERE purpose = 'card' ORDER BY rowid DESC LIMIT 1",
            [],
            |r| r.get::<_, String>(0),
        )
        .optional()?
        .and_then(|json| serde_json::from_str::<serde_json::Value>(&json).ok())
        .and_then(|event| event["created_at"].as_u64())
    };
    let now = Timestamp::now().as_secs();
    let updated_at = last_card_at.map_or(now, |last| now.max(last + 1));
    Ok(CardContent {
        name: identity.name,
        about: Some(config.nostr.about.clone().unwrap_or_else(|| {
            "An autonomous agent that lives on its own Lightning wallet (Automaton-LN).".to_string()
        })),
        picture: None,
        version: VERSION.to_string(),
        status: CardStatus::from_tier(tier.as_deref()),
        tier: Some(tier.unwrap_or_else(|| "normal".to_string())),
        ln_node_pubkey: identity.node_id,
        ln_node_addr: identity.node_addr,
        node_sig: None,
        lud16: identity.lightning_address,
        lnurlp: identity.lnurlp,
        web: identity.web,
        services: card_services(config),
        parent: config.nostr.parent.clone(),
        children: {
            let n: i64 = conn.query_row(
                "SELECT count(*) FROM children WHERE state IN ('funded', 'alive', 'unhealthy')",
                [],
                |r| r.get(0),
            )?;
            (n > 0).then_some(n as u32)
        },
        updated_at,
    })
}

/// The current card, signed.
pub async fn signed_card(
    db: &Db,
    keys: &Keys,
    config: &Config,
) -> Result<(CardContent, Event), NostrError> {
    let config_for_db = config.clone();
    let content = db.call(move |c| current_card(&config_for_db, c)).await?;
    let event = card_event(keys, &content)?;
    Ok((content, event))
}

/// What a one-off publish achieved.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Published {
    pub event_id: String,
    pub accepted: Vec<String>,
    /// Relays that did not take it (they stay in the outbox for the running agent to retry).
    pub failed: Vec<(String, String)>,
}

/// Queues `event` in the outbox and sends it right away to every relay, waiting briefly for connections.
/// `Err(NotAccepted)` when no relay took it; the event stays queued either way.
pub async fn publish_now(
    db: &Db,
    keys: &Keys,
    relays: &RelaySet,
    event: &Event,
    purpose: Purpose,
) -> Result<Published, NostrError> {
    relays.require()?;
    outbox::enqueue(db, event, relays, purpose).await?;
    let client = relays::client(keys, relays).await?;
    relays::wait_connected(&client, CONNECT_WAIT).await;
    let results = relays::send_to(&client, event, relays.urls()).await;
    client.shutdown().await;
    let event_id = event.id.to_hex();
    let mut accepted = Vec::new();
    let mut failed = Vec::new();
    for (url, result) in results {
        match result {
            Ok(()) => {
                outbox::mark_sent(db, &event_id, url.as_str()).await?;
                accepted.push(url.to_string());
            }
            Err(why) => failed.push((url.to_string(), why)),
        }
    }
    if accepted.is_empty() {
        return Err(NostrError::NotAccepted { failures: failed });
    }
    Ok(Published {
        event_id,
        accepted,
        failed,
    })
}

/// Sends what waits in the outbox from a short-lived client (tools and heartbeat tasks; the running presence
/// flushes on its own too). Bounded by the connection wait and one send timeout.
pub async fn flush_now(
    db: &Db,
    keys: &Keys,
    relays: &RelaySet,
) -> Result<outbox::FlushReport, NostrError> {
    relays.require()?;
    let client = relays::client(keys, relays).await?;
    relays::wait_connected(&client, CONNECT_WAIT).await;
    let report = outbox::flush(db, &client).await;
    client.shutdown().await;
    report
}

/// The running presence; [`Presence::stop`] ends it after a last, bounded flush of the outbox.
pub struct Presence {
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Presence {
    /// Stops the presence and waits for its last flush (a few seconds at most).
    pub async fn stop(self) {
        self.cancel.cancel();
        let _ = self.task.await;
    }
}

/// Starts the live presence in the background; it ends when `cancel` fires or on [`Presence::stop`]. Returns
/// `None` (after saying why in the log) when the agent has no wallet key or no relays.
pub fn spawn(home: &Home, config: &Config, db: Db, cancel: CancellationToken) -> Option<Presence> {
    let relays = match RelaySet::from_config(config) {
        Ok(relays) if relays.is_empty() => {
            tracing::info!("no nostr.relays configured: no Nostr presence");
            return None;
        }
        Ok(relays) => relays,
        Err(e) => {
            tracing::warn!(error = %e, "no Nostr presence");
            return None;
        }
    };
    let keys = match super::agent_keys(home) {
        Ok(keys) => keys,
        Err(e) => {
            tracing::warn!(error = %e, "no Nostr presence");
            return None;
        }
    };
    let config = config.clone();
    let own = cancel.child_token();
    let task = tokio::spawn({
        let cancel = own.clone();
        async move {
            let span = tracing::info_span!("nostr", npub = %super::npub(&keys.public_key()));
            tracing::Instrument::instrument(live(config, db, keys, relays, cancel), span).await;
        }
    });
    Some(Presence { cancel: own, task })
}

async fn live(config: Config, db: Db, keys: Keys, relays: RelaySet, cancel: CancellationToken) {
    let client = match relays::client(&keys, &relays).await {
        Ok(client) => client,
        Err(e) => {
            tracing::warn!(error = %e, "cannot start the relay client: no Nostr presence");
            return;
        }
    };
    tracing::info!(relays = ?relays.strings(), "Nostr presence started");
    let mut published: Option<CardContent> = None;
    let mut last_status: Option<CardStatus> = None;
    let mut ticker = tokio::time::interval(TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = ticker.tick() => {}
        }
        if let Err(e) = tick(
            &db,
            &keys,
            &config,
            &relays,
            &client,
            &mut published,
            &mut last_status,
        )
        .await
        {
            tracing::warn!(error = %e, "Nostr presence tick failed");
        }
    }
    // One last try for whatever is queued (a dead card, a distress note), bounded.
    let _ = tokio::time::timeout(FINAL_FLUSH, outbox::flush(&db, &client)).await;
    client.shutdown().await;
    tracing::info!("Nostr presence stopped");
}

async fn tick(
    db: &Db,
    keys: &Keys,
    config: &Config,
    relays: &RelaySet,
    client: &nostr_sdk::Client,
    published: &mut Option<CardContent>,
    last_status: &mut Option<CardStatus>,
) -> Result<(), NostrError> {
    let config_for_db = config.clone();
    let (content, identity) = db
        .call(move |c| {
            Ok((
                current_card(&config_for_db, c)?,
                Identity::read(&config_for_db, c)?,
            ))
        })
        .await?;
    // Publish at start, whenever the card changes, and when the newest card (maybe from the heartbeat's
    // `publish_card`) is older than the interval.
    let interval = config.nostr.card_interval_secs;
    let changed = published.as_ref().is_none_or(|p| !p.same_as(&content));
    let latest_at = outbox::latest_event(db, Purpose::Card)
        .await?
        .map(|e| e.created_at.as_secs());
    let stale = latest_at.is_none_or(|at| content.updated_at.saturating_sub(at) >= interval);
    if changed || stale {
        let event = card_event(keys, &content)?;
        outbox::enqueue(db, &event, relays, Purpose::Card).await?;
        tracing::info!(status = %content.status, event_id = %event.id, "card queued");
    }
    *published = Some(content.clone());
    if *last_status != Some(content.status) {
        // A newborn is critical before anyone has paid it; once funded, a status it drains back to between two
        // ticks must still raise the alarm, so "never funded" leaves the status unsettled (tried again next tick).
        let mut settled = true;
        if content.status.is_distress() {
            match distress::signal(
                db,
                keys,
                config,
                &identity,
                relays,
                content.status,
                distress::Trigger::Automatic,
            )
            .await?
            {
                Ok(sent) => tracing::warn!(event_id = %sent.event_id, "distress signal queued"),
                Err(distress::NoDistress::NeverFunded) => settled = false,
                Err(why) => tracing::info!(?why, "no distress note"),
            }
        }
        if settled {
            *last_status = Some(content.status);
        }
    }
    let report = outbox::flush(db, client).await?;
    if report.sent + report.failed > 0 {
        tracing::debug!(?report, "outbox flushed");
    }
    Ok(())
}

/// Relay URLs as strings, for logs and JSON.
pub fn relay_strings(urls: &[RelayUrl]) -> Vec<String> {
    urls.iter().map(|u| u.to_string()).collect()
}
