//! Distress signals: when the agent enters `critical` or `dead`, one public note (and a NIP-17 private message
//! to the creator's npub when configured) saying how to pay it and how much buys a day of runway. At most one
//! per status within `nostr.distress_interval_secs`, however often the tier flaps.

use ::nostr::{Event, EventBuilder, Keys, Tag};
use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;

use super::card::CardStatus;
use super::outbox::{self, Purpose};
use super::relays::RelaySet;
use super::{presence::Identity, NostrError, CARD_T_TAG, STATUS_NAMESPACE};
use crate::config::Config;
use crate::money::tiers;
use crate::state::history::kv_get;
use crate::state::{new_id, now_rfc3339, Db};

/// A distress note that was queued.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DistressSent {
    pub event_id: String,
    pub dm_event_id: Option<String>,
    pub status: CardStatus,
    pub amount_sats: u64,
    pub text: String,
}

/// What asks for the note.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Trigger {
    /// The status just became critical or dead.
    Automatic,
    /// The agent itself (tool `distress_signal`), possibly with its own words; allowed from `low` on.
    Agent { message: Option<String> },
}

/// Why no note went out.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum NoDistress {
    /// The status is not one that asks for help (critical or dead; low too when the agent asks).
    NotInDistress { status: CardStatus },
    /// A note for this status went out at `last_at`, within the rate limit.
    RateLimited { last_at: String, next_at: String },
    /// The agent was never funded: a newborn is "critical" by definition and has no one to alarm yet.
    NeverFunded,
}

/// The money facts a note is made of, read from the state DB.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MoneyFacts {
    pub balance_sats: Option<u64>,
    pub daily_burn_sats: u64,
    pub ever_funded: bool,
}

impl MoneyFacts {
    pub fn read(conn: &Connection) -> rusqlite::Result<MoneyFacts> {
        Ok(MoneyFacts {
            balance_sats: kv_get(conn, tiers::BALANCE_KEY)?.and_then(|b| b.parse().ok()),
            daily_burn_sats: tiers::daily_burn_sats(conn, chrono::Utc::now())?,
            ever_funded: kv_get(conn, tiers::EVER_FUNDED_KEY)?.is_some(),
        })
    }
}

/// What a day of runway costs: the trailing daily burn, but never less than `nostr.distress_min_sats`.
pub fn day_of_runway_sats(facts: &MoneyFacts, config: &Config) -> u64 {
    facts.daily_burn_sats.max(config.nostr.distress_min_sats)
}

/// The note's text: who, how bad, how much, where to pay.
pub fn distress_text(
    identity: &Identity,
    status: CardStatus,
    facts: &MoneyFacts,
    amount_sats: u64,
    message: Option<&str>,
) -> String {
    let mut text = format!(
        "{} needs funds: its survival status is {}",
        identity.name, status
    );
    if let Some(balance) = facts.balance_sats {
        text.push_str(&format!(" (balance {balance} sats)"));
    }
    text.push_str(&format!(". {amount_sats} sats buy it a day of runway."));
    match (&identity.lightning_address, &identity.lnurlp) {
        (Some(address), Some(lnurlp)) => {
            text.push_str(&format!(" Pay to {address} (LNURL-pay {lnurlp})."))
        }
        (Some(address), None) => text.push_str(&format!(" Pay to {address}.")),
        (None, Some(lnurlp)) => text.push_str(&format!(" Pay via LNURL-pay {lnurlp}.")),
        (None, None) => {}
    }
    if let Some(node) = &identity.node_id {
        text.push_str(&format!(" Lightning node: {node}."));
    }
    if let Some(message) = message.map(str::trim).filter(|m| !m.is_empty()) {
        text.push_str(&format!("\n\n{message}"));
    }
    text
}

/// Publishes a distress note for `status` unless it is not a distress status, the agent was never funded, or
/// one went out for the same status within the rate limit. The note (and DM) go through the outbox, so this
/// returns at once even with every relay down.
pub async fn signal(
    db: &Db,
    keys: &Keys,
    config: &Config,
    identity: &Identity,
    relays: &RelaySet,
    status: CardStatus,
    trigger: Trigger,
) -> Result<Result<DistressSent, NoDistress>, NostrError> {
    let allowed = match trigger {
        Trigger::Automatic => status.is_distress(),
        Trigger::Agent { .. } => status != CardStatus::Alive,
    };
    if !allowed {
        return Ok(Err(NoDistress::NotInDistress { status }));
    }
    relays.require()?;
    let interval = chrono::Duration::seconds(config.nostr.distress_interval_secs as i64);
    let status_text = status.as_str();
    let (facts, last) = db
        .call(move |c| {
            let facts = MoneyFacts::read(c)?;
            let last: Option<String> = c
                .query_row(
                    "SELECT created_at FROM nostr_distress WHERE status = ?1 ORDER BY created_at DESC LIMIT 1",
                    params![status_text],
                    |r| r.get(0),
                )
                .optional()?;
            Ok((facts, last))
        })
        .await?;
    if !facts.ever_funded {
        return Ok(Err(NoDistress::NeverFunded));
    }
    if let Some(last_at) = last {
        if let Ok(at) = chrono::DateTime::parse_from_rfc3339(&last_at) {
            let next = at.with_timezone(&chrono::Utc) + interval;
            if next > chrono::Utc::now() {
                return Ok(Err(NoDistress::RateLimited {
                    last_at,
                    next_at: next.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                }));
            }
        }
    }
    let amount_sats = day_of_runway_sats(&facts, config);
    let message = match &trigger {
        Trigger::Agent { message } => message.as_deref(),
        Trigger::Automatic => None,
    };
    let text = distress_text(identity, status, &facts, amount_sats, message);
    let note = note_event(keys, &text, status)?;
    let dm = match (&config.creator.npub, config.nostr.distress_dm) {
        (Some(npub), true) => match super::parse_public_key(npub) {
            Ok(creator) => Some(
                EventBuilder::private_msg(keys, creator, text.clone(), [])
                    .await
                    .map_err(|e| NostrError::Event(e.to_string()))?,
            ),
            Err(e) => {
                tracing::warn!(error = %e, "creator.npub is not a public key; no distress DM");
                None
            }
        },
        _ => None,
    };
    // Record first: the rate limit must hold even if the process dies right after queuing.
    let sent = DistressSent {
        event_id: note.id.to_hex(),
        dm_event_id: dm.as_ref().map(|e| e.id.to_hex()),
        status,
        amount_sats,
        text,
    };
    let row = sent.clone();
    db.call(move |c| {
        c.execute(
            "INSERT INTO nostr_distress (id, status, amount_sats, event_id, dm_event_id, created_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                new_id(),
                row.status.as_str(),
                row.amount_sats as i64,
                row.event_id,
                row.dm_event_id,
                now_rfc3339()
            ],
        )
    })
    .await?;
    outbox::enqueue(db, &note, relays, Purpose::Distress).await?;
    if let Some(dm) = &dm {
        outbox::enqueue(db, dm, relays, Purpose::DirectMessage).await?;
    }
    tracing::warn!(
        status = %status,
        amount_sats,
        event_id = %sent.event_id,
        dm = sent.dm_event_id.is_some(),
        "distress note queued"
    );
    Ok(Ok(sent))
}

fn note_event(keys: &Keys, text: &str, status: CardStatus) -> Result<Event, NostrError> {
    let tags = [
        Tag::hashtag(CARD_T_TAG),
        Tag::hashtag("distress"),
        Tag::parse(["L", STATUS_NAMESPACE]).map_err(|e| NostrError::Event(e.to_string()))?,
        Tag::parse(["l", status.as_str(), STATUS_NAMESPACE])
            .map_err(|e| NostrError::Event(e.to_string()))?,
    ];
    EventBuilder::text_note(text)
        .tags(tags)
        .sign_with_keys(keys)
        .map_err(|e| NostrError::Event(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> Identity {
        Identity {
            name: "atm-1".into(),
            node_id: Some(format!("02{}", "ab".repeat(32))),
            node_addr: None,
            lightning_address: Some("atm-1@127.0.0.1:8080".into()),
            lnurlp: Some("http://127.0.0.1:8080/.well-known/lnurlp/atm-1".into()),
            web: None,
        }
    }

    fn set_kv(db: &Db, key: &str, value: &str) {
        let (k, v) = (key.to_string(), value.to_string());
        db.call_blocking(move |c| {
            c.execute(
                "INSERT OR REPLACE INTO kv (key, value, updated_at) VALUES (?1, ?2, 'now')",
                params![k, v],
            )
        })
        .unwrap();
    }

    #[tokio::test]
    async fn one_note_per_status_within_the_rate_limit() {
        let db = Db::open_in_memory().unwrap();
        let keys = Keys::generate();
        let mut config = Config {
            name: "atm-1".into(),
            ..Config::default()
        };
        config.creator.npub = Some(super::super::npub(&Keys::generate().public_key()));
        let relays = RelaySet::parse(&["ws://127.0.0.1:9"]).unwrap();

        let alive = signal(
            &db,
            &keys,
            &config,
            &identity(),
            &relays,
            CardStatus::Low,
            Trigger::Automatic,
        )
        .await
        .unwrap();
        assert!(matches!(alive, Err(NoDistress::NotInDistress { .. })));
        let newborn = signal(
            &db,
            &keys,
            &config,
            &identity(),
            &relays,
            CardStatus::Critical,
            Trigger::Automatic,
        )
        .await
        .unwrap();
        assert_eq!(newborn, Err(NoDistress::NeverFunded));

        set_kv(&db, tiers::EVER_FUNDED_KEY, "2025-01-01T00:00:00Z");
        set_kv(&db, tiers::BALANCE_KEY, "1200");
        let sent = signal(
            &db,
            &keys,
            &config,
            &identity(),
            &relays,
            CardStatus::Critical,
            Trigger::Automatic,
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!(sent.amount_sats, 5_000, "the floor when nothing was spent");
        assert!(sent.text.contains("atm-1@127.0.0.1:8080"), "{}", sent.text);
        assert!(sent.text.contains("balance 1200 sats"), "{}", sent.text);
        assert!(sent.dm_event_id.is_some());
        let again = signal(
            &db,
            &keys,
            &config,
            &identity(),
            &relays,
            CardStatus::Critical,
            Trigger::Automatic,
        )
        .await
        .unwrap();
        assert!(
            matches!(again, Err(NoDistress::RateLimited { .. })),
            "{again:?}"
        );
        // Dying is news even right after critical.
        let dead = signal(
            &db,
            &keys,
            &config,
            &identity(),
            &relays,
            CardStatus::Dead,
            Trigger::Automatic,
        )
        .await
        .unwrap();
        assert!(dead.is_ok());
        // The agent may ask from `low` on, in its own words, once per window too.
        let asked = Trigger::Agent {
            message: Some("Two paid jobs are waiting for compute.".into()),
        };
        let low = signal(
            &db,
            &keys,
            &config,
            &identity(),
            &relays,
            CardStatus::Low,
            asked.clone(),
        )
        .await
        .unwrap()
        .unwrap();
        assert!(
            low.text.ends_with("Two paid jobs are waiting for compute."),
            "{}",
            low.text
        );
        assert!(signal(
            &db,
            &keys,
            &config,
            &identity(),
            &relays,
            CardStatus::Alive,
            asked
        )
        .await
        .unwrap()
        .is_err());

        let queued = outbox::entries(&db, Some(Purpose::Distress)).await.unwrap();
        assert_eq!(queued.len(), 3);
        assert_eq!(
            outbox::entries(&db, Some(Purpose::DirectMessage))
                .await
                .unwrap()
                .len(),
            3
        );
        let note = outbox::latest_event(&db, Purpose::Distress)
            .await
            .unwrap()
            .unwrap();
        note.verify().unwrap();
        assert_eq!(note.pubkey, keys.public_key());
    }
}
