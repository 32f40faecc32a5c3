//! The persistent outbox: every event the agent publishes is written here first (one row per relay) and sent
//! from here, so a relay that is down when the event is made still gets it once it is back, even across
//! restarts. A relay that refuses or times out is retried with backoff; a relay that is simply not connected
//! is skipped without counting an attempt, and tried as soon as it reconnects.

use std::collections::BTreeMap;
use std::time::Duration;

use ::nostr::{Event, JsonUtil, RelayUrl};
use nostr_sdk::{Client, RelayStatus};
use rusqlite::{params, OptionalExtension};
use serde::Serialize;

use super::relays::{send_to, RelaySet};
use super::NostrError;
use crate::state::{now_rfc3339, Db};

/// Longest wait between two attempts at a relay that answered with an error.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// Sent rows are kept this long (for `card show` and debugging), then pruned.
const KEEP_SENT: chrono::Duration = chrono::Duration::days(7);

/// What an event is for; a newer card supersedes an unsent older one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    Card,
    Distress,
    DirectMessage,
    Note,
    WalletInfo,
}

impl Purpose {
    pub fn as_str(self) -> &'static str {
        match self {
            Purpose::Card => "card",
            Purpose::Distress => "distress",
            Purpose::DirectMessage => "dm",
            Purpose::Note => "note",
            Purpose::WalletInfo => "nwc_info",
        }
    }
}

/// Queues `event` for every relay of `relays`. Queuing the same event twice is a no-op. A new card removes
/// any older card still waiting for a relay: relays keep only the newest anyway.
pub async fn enqueue(
    db: &Db,
    event: &Event,
    relays: &RelaySet,
    purpose: Purpose,
) -> Result<(), NostrError> {
    let relays = relays.require()?.strings();
    let id = event.id.to_hex();
    let kind = u16::from(event.kind) as i64;
    let json = event.as_json();
    db.call(move |c| {
        let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let now = now_rfc3339();
        if purpose == Purpose::Card {
            tx.execute(
                "DELETE FROM nostr_outbox WHERE purpose = 'card' AND sent_at IS NULL AND event_id <> ?1",
                params![id],
            )?;
        }
        for relay in &relays {
            tx.execute(
                "INSERT OR IGNORE INTO nostr_outbox \
                 (event_id, relay, kind, purpose, event_json, created_at, next_attempt_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)",
                params![id, relay, kind, purpose.as_str(), json, now],
            )?;
        }
        tx.commit()
    })
    .await?;
    Ok(())
}

/// Records that `relay` already accepted `event` (sent directly, not through a flush).
pub async fn mark_sent(db: &Db, event_id: &str, relay: &str) -> Result<(), NostrError> {
    let (id, relay) = (event_id.to_string(), relay.to_string());
    db.call(move |c| {
        c.execute(
            "UPDATE nostr_outbox SET sent_at = ?3, last_error = NULL WHERE event_id = ?1 AND relay = ?2",
            params![id, relay, now_rfc3339()],
        )
    })
    .await?;
    Ok(())
}

/// What one flush did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct FlushReport {
    /// (event, relay) pairs a relay accepted.
    pub sent: usize,
    /// Pairs that failed and wait for their next attempt.
    pub failed: usize,
    /// Pairs skipped because their relay is not connected right now.
    pub waiting: usize,
}

/// Sends every due row whose relay is connected in `client` (rows for relays the client does not know wait). Bounded: each relay gets at most `SEND_TIMEOUT`, all in
/// parallel, so one flush never takes much longer than that.
pub async fn flush(db: &Db, client: &Client) -> Result<FlushReport, NostrError> {
    let now = now_rfc3339();
    let rows: Vec<(String, String, String)> = db
        .call({
            let now = now.clone();
            move |c| {
                let cutoff = (chrono::Utc::now() - KEEP_SENT)
                    .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
                // Sent rows are history; unsent ones this old belong to a relay that is gone for good.
                c.execute(
                    "DELETE FROM nostr_outbox WHERE created_at < ?1",
                    params![cutoff],
                )?;
                let mut stmt = c.prepare(
                    "SELECT event_id, relay, event_json FROM nostr_outbox \
                     WHERE sent_at IS NULL AND next_attempt_at <= ?1 ORDER BY created_at",
                )?;
                let rows =
                    stmt.query_map(params![now], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
                rows.collect()
            }
        })
        .await?;
    let mut report = FlushReport::default();
    if rows.is_empty() {
        return Ok(report);
    }
    let connected = connected_relays(client).await;
    let mut by_event: BTreeMap<String, (Event, Vec<RelayUrl>)> = BTreeMap::new();
    for (id, relay, json) in rows {
        let Ok(url) = RelayUrl::parse(&relay) else {
            continue;
        };
        if !connected.contains(&url) {
            report.waiting += 1;
            continue;
        }
        match Event::from_json(&json) {
            Ok(event) => by_event
                .entry(id)
                .or_insert_with(|| (event, Vec::new()))
                .1
                .push(url),
            Err(e) => {
                // Only this module writes the column; a row that does not parse can never be sent.
                tracing::warn!(event_id = %id, error = %e, "dropping an unreadable outbox row");
                let id = id.clone();
                db.call(move |c| {
                    c.execute("DELETE FROM nostr_outbox WHERE event_id = ?1", params![id])
                })
                .await?;
            }
        }
    }
    let sends = by_event.into_iter().map(|(id, (event, urls))| async move {
        let results = send_to(client, &event, &urls).await;
        (id, results)
    });
    let outcomes = futures::future::join_all(sends).await;
    for (id, results) in outcomes {
        for (url, result) in results {
            let relay = url.to_string();
            let id = id.clone();
            match result {
                Ok(()) => {
                    report.sent += 1;
                    tracing::info!(event_id = %id, %relay, "relay accepted the event");
                    mark_sent(db, &id, &relay).await?;
                }
                Err(error) => {
                    report.failed += 1;
                    tracing::warn!(event_id = %id, %relay, %error, "relay did not take the event; will retry");
                    db.call(move |c| {
                        let attempts: i64 = c
                            .query_row(
                                "SELECT attempts FROM nostr_outbox WHERE event_id = ?1 AND relay = ?2",
                                params![id, relay],
                                |r| r.get(0),
                            )
                            .optional()?
                            .unwrap_or(0);
                        let next = chrono::Utc::now() + backoff(attempts as u32 + 1);
                        c.execute(
                            "UPDATE nostr_outbox SET attempts = attempts + 1, last_error = ?3, next_attempt_at = ?4 \
                             WHERE event_id = ?1 AND relay = ?2",
                            params![
                                id,
                                relay,
                                error,
                                next.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
                            ],
                        )
                    })
                    .await?;
                }
            }
        }
    }
    Ok(report)
}

/// 5 s, 10 s, 20 s, … capped at [`MAX_BACKOFF`].
fn backoff(attempts: u32) -> chrono::Duration {
    let secs = 5u64
        .saturating_mul(1u64 << attempts.saturating_sub(1).min(16))
        .min(MAX_BACKOFF.as_secs());
    chrono::Duration::seconds(secs as i64)
}

async fn connected_relays(client: &Client) -> Vec<RelayUrl> {
    client
        .relays()
        .await
        .into_iter()
        .filter(|(_, relay)| relay.status() == RelayStatus::Connected)
        .map(|(url, _)| url)
        .collect()
}

/// One outbox row, for `card show` and tests.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct OutboxEntry {
    pub event_id: String,
    pub relay: String,
    pub kind: u16,
    pub purpose: String,
    pub created_at: String,
    pub attempts: u32,
    pub last_error: Option<String>,
    pub sent_at: Option<String>,
}

/// Every row for events of `purpose` (all purposes when `None`), newest first.
pub async fn entries(db: &Db, purpose: Option<Purpose>) -> Result<Vec<OutboxEntry>, NostrError> {
    let purpose = purpose.map(|p| p.as_str().to_string());
    let rows = db
        .call(move |c| {
            let mut stmt = c.prepare(
                "SELECT event_id, relay, kind, purpose, created_at, attempts, last_error, sent_at \
                 FROM nostr_outbox WHERE (?1 IS NULL OR purpose = ?1) ORDER BY created_at DESC, relay",
            )?;
            let rows = stmt.query_map(params![purpose], |r| {
                Ok(OutboxEntry {
                    event_id: r.get(0)?,
                    relay: r.get(1)?,
                    kind: r.get::<_, i64>(2)? as u16,
                    purpose: r.get(3)?,
                    created_at: r.get(4)?,
                    attempts: r.get::<_, i64>(5)? as u32,
                    last_error: r.get(6)?,
                    sent_at: r.get(7)?,
                })
            })?;
            rows.collect()
        })
        .await?;
    Ok(rows)
}

/// The newest queued event of `purpose`, whether or not it was sent yet.
pub async fn latest_event(db: &Db, purpose: Purpose) -> Result<Option<Event>, NostrError> {
    let purpose = purpose.as_str();
    let json: Option<String> = db
        .call(move |c| {
            c.query_row(
                "SELECT event_json FROM nostr_outbox WHERE purpose = ?1 ORDER BY created_at DESC, rowid DESC LIMIT 1",
                params![purpose],
                |r| r.get(0),
            )
            .optional()
        })
        .await?;
    Ok(json.and_then(|j| Event::from_json(j).ok()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ::nostr::{EventBuilder, Keys};

    #[tokio::test]
    async fn enqueue_is_idempotent_and_a_new_card_supersedes_an_unsent_one() {
        let db = Db::open_in_memory().unwrap();
        let keys = Keys::generate();
        let relays = RelaySet::parse(&["ws://127.0.0.1:1", "ws://127.0.0.1:2"]).unwrap();
        let first = EventBuilder::text_note("one")
            .sign_with_keys(&keys)
            .unwrap();
        enqueue(&db, &first, &relays, Purpose::Card).await.unwrap();
        enqueue(&db, &first, &relays, Purpose::Card).await.unwrap();
        assert_eq!(entries(&db, None).await.unwrap().len(), 2);
        mark_sent(&db, &first.id.to_hex(), "ws://127.0.0.1:1")
            .await
            .unwrap();

        let second = EventBuilder::text_note("two")
            .sign_with_keys(&keys)
            .unwrap();
        enqueue(&db, &second, &relays, Purpose::Card).await.unwrap();
        let rows = entries(&db, Some(Purpose::Card)).await.unwrap();
        // The sent row of the first card stays (history); its unsent row is gone.
        assert_eq!(rows.len(), 3, "{rows:?}");
        assert!(rows
            .iter()
            .all(|r| r.event_id == second.id.to_hex() || r.sent_at.is_some()));
        assert_eq!(
            latest_event(&db, Purpose::Card)
                .await
                .unwrap()
                .map(|e| e.id),
            Some(second.id)
        );

        let note = EventBuilder::text_note("help")
            .sign_with_keys(&keys)
            .unwrap();
        enqueue(&db, &note, &relays, Purpose::Distress)
            .await
            .unwrap();
        assert_eq!(entries(&db, Some(Purpose::Card)).await.unwrap().len(), 3);
        assert!(enqueue(
            &db,
            &note,
            &RelaySet::parse::<&str>(&[]).unwrap(),
            Purpose::Note
        )
        .await
        .is_err());
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        assert_eq!(backoff(1).num_seconds(), 5);
        assert_eq!(backoff(2).num_seconds(), 10);
        assert_eq!(backoff(4).num_seconds(), 40);
        assert_eq!(backoff(40).num_seconds(), 60);
    }
}
