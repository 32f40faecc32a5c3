//! Private messages between a parent and its children: NIP-17 (gift-wrapped, signed by the sender's agent key).
//! An incoming message counts only when its sealed author is the configured parent or a recorded child; it is
//! delivered once into the agent loop as a wake event from `parent` or `child:<name>`, which the loop shows as
//! untrusted content from a known peer, never as the creator.

use std::time::Duration;

use nostr::nips::nip59::UnwrappedGift;
use nostr::{EventBuilder, Filter, Kind, Timestamp};
use rusqlite::params;

use super::ReplicationError;
use crate::config::Config;
use crate::home::Home;
use crate::state::{now_rfc3339, Db};

/// Longest message (characters).
pub const MAX_MESSAGE_CHARS: usize = 4_000;
/// Gift wraps carry a randomised `created_at` up to two days back; look a little further.
const LOOKBACK_SECS: u64 = 3 * 86_400;

fn failed(e: impl std::fmt::Display) -> ReplicationError {
    ReplicationError::Failed(e.to_string())
}

/// Sends `text` to `npub` (`peer` is how it is recorded: `parent` or `child:<name>`); returns the event id once a
/// relay accepted it.
pub async fn send(
    home: &Home,
    config: &Config,
    db: &Db,
    peer: &str,
    npub: &str,
    text: &str,
) -> Result<String, ReplicationError> {
    let text = text.trim();
    if text.is_empty() || text.chars().count() > MAX_MESSAGE_CHARS {
        return Err(ReplicationError::Refused(format!(
            "a message is 1 to {MAX_MESSAGE_CHARS} characters"
        )));
    }
    let receiver = crate::nostr::parse_public_key(npub).map_err(failed)?;
    let keys = crate::nostr::keys::agent_keys(home).map_err(failed)?;
    let relays = crate::nostr::relays::RelaySet::from_config(config).map_err(failed)?;
    relays.require().map_err(failed)?;
    let event = EventBuilder::private_msg(&keys, receiver, text, [])
        .await
        .map_err(failed)?;
    let client = crate::nostr::relays::client(&keys, &relays)
        .await
        .map_err(failed)?;
    crate::nostr::relays::wait_connected(&client, Duration::from_secs(5)).await;
    let results = crate::nostr::relays::send_to(&client, &event, relays.urls()).await;
    client.shutdown().await;
    if !results.iter().any(|(_, r)| r.is_ok()) {
        let why: Vec<String> = results
            .iter()
            .map(|(url, r)| format!("{url}: {}", r.as_ref().err().cloned().unwrap_or_default()))
            .collect();
        return Err(ReplicationError::Failed(format!(
            "no relay took the message ({})",
            why.join("; ")
        )));
    }
    let (id, peer, npub, text) = (
        event.id.to_hex(),
        peer.to_string(),
        npub.to_string(),
        text.to_string(),
    );
    let event_id = id.clone();
    db.call(move |c| {
        c.execute(
            "INSERT OR IGNORE INTO family_messages (event_id, direction, peer, peer_npub, text, at) \
             VALUES (?1, 'out', ?2, ?3, ?4, ?5)",
            params![id, peer, npub, text, now_rfc3339()],
        )
    })
    .await?;
    Ok(event_id)
}

/// The peers this agent takes messages from: its parent (config) and its children (recorded), by public key.
async fn family(
    config: &Config,
    db: &Db,
) -> Result<Vec<(String, nostr::PublicKey, String)>, ReplicationError> {
    let mut peers = Vec::new();
    if let Some(parent) = &config.nostr.parent {
        if let Ok(pk) = crate::nostr::parse_public_key(parent) {
            peers.push(("parent".to_string(), pk, parent.clone()));
        }
    }
    for child in super::list(db).await? {
        if let Some(npub) = &child.npub {
            if let Ok(pk) = crate::nostr::parse_public_key(npub) {
                peers.push((format!("child:{}", child.name), pk, npub.clone()));
            }
        }
    }
    Ok(peers)
}

/// Fetches private messages addressed to this agent, keeps those from its family that were not seen before,
/// and queues each as a wake event. Returns how many were delivered.
pub async fn receive(home: &Home, config: &Config, db: &Db) -> Result<usize, ReplicationError> {
    let peers = family(config, db).await?;
    if peers.is_empty() {
        return Ok(0);
    }
    let relays = crate::nostr::relays::RelaySet::from_config(config).map_err(failed)?;
    if relays.is_empty() {
        return Ok(0);
    }
    let keys = crate::nostr::keys::agent_keys(home).map_err(failed)?;
    let client = crate::nostr::relays::client(&keys, &relays)
        .await
        .map_err(failed)?;
    crate::nostr::relays::wait_connected(&client, Duration::from_secs(3)).await;
    let since = Timestamp::from(Timestamp::now().as_secs().saturating_sub(LOOKBACK_SECS));
    let filter = Filter::new()
        .kind(Kind::GiftWrap)
        .pubkey(keys.public_key())
        .since(since);
    let events = crate::nostr::relays::fetch(&client, filter, Duration::from_secs(3))
        .await
        .map_err(failed)?;
    client.shutdown().await;
    let mut delivered = 0;
    for event in events {
        let id = event.id.to_hex();
        let known = {
            let id = id.clone();
            db.call(move |c| {
                c.query_row(
                    "SELECT count(*) FROM family_messages WHERE event_id = ?1",
                    [id],
                    |r| r.get::<_, i64>(0),
                )
            })
            .await?
        };
        if known > 0 {
            continue;
        }
        let Ok(gift) = UnwrappedGift::from_gift_wrap(&keys, &event).await else {
            continue;
        };
        let Some((peer, _, npub)) = peers.iter().find(|(_, pk, _)| *pk == gift.sender) else {
            continue;
        };
        if gift.rumor.kind != Kind::PrivateDirectMessage {
            continue;
        }
        let text: String = gift.rumor.content.chars().take(MAX_MESSAGE_CHARS).collect();
        let (peer, npub) = (peer.clone(), npub.clone());
        let inserted = db
            .call(move |c| {
                let tx = rusqlite::Transaction::new_unchecked(c, rusqlite::TransactionBehavior::Immediate)?;
                let n = tx.execute(
                    "INSERT OR IGNORE INTO family_messages (event_id, direction, peer, peer_npub, text, at) \
                     VALUES (?1, 'in', ?2, ?3, ?4, ?5)",
                    params![id, peer, npub, text, now_rfc3339()],
                )?;
                if n > 0 {
                    tx.execute(
                        "INSERT INTO wake_events (source, reason, created_at) VALUES (?1, ?2, ?3)",
                        params![peer, format!("message from your {peer} ({npub}): {text}"), now_rfc3339()],
                    )?;
                }
                tx.commit()?;
                Ok(n)
            })
            .await?;
        delivered += inserted;
    }
    Ok(delivered)
}

/// Messages exchanged with one peer (`parent` or `child:<name>`), oldest first.
pub async fn history(db: &Db, peer: &str) -> Result<Vec<serde_json::Value>, ReplicationError> {
    let peer = peer.to_string();
    Ok(db
        .call(move |c| {
            let mut stmt = c.prepare(
                "SELECT direction, text, at, event_id FROM family_messages WHERE peer = ?1 ORDER BY at, rowid",
            )?;
            let rows = stmt.query_map([peer], |r| {
                Ok(serde_json::json!({
                    "direction": r.get::<_, String>(0)?,
                    "text": r.get::<_, String>(1)?,
                    "at": r.get::<_, String>(2)?,
                    "event_id": r.get::<_, String>(3)?,
                }))
            })?;
            rows.collect()
        })
        .await?)
}
