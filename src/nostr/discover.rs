//! Discovery: other agents' cards from relays (signature and identity checked, content read leniently, the
//! newest card per agent kept and cached in the state DB), and an agent's own description over HTTP
//! (`/.well-known/automaton.json`).

use std::collections::BTreeMap;
use std::time::Duration;

use ::nostr::{Alphabet, Filter, JsonUtil, Kind, SingleLetterTag, Timestamp};
use nostr_sdk::Client;
use rusqlite::params;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::card::{parse_card, AgentCard, CardRejection};
use super::{relays, NostrError, CARD_KIND, CARD_T_TAG};
use crate::state::{now_rfc3339, Db};

/// The longest an agent description body may be.
const MAX_DESCRIPTION_BYTES: usize = 256 * 1024;

/// What to look for.
#[derive(Clone, Debug, Default)]
pub struct Query {
    /// Only agents offering a service whose id or description contains this (or a job kind number).
    pub service: Option<String>,
    /// Also list agents whose newest card is older than `stale_after_secs`.
    pub include_stale: bool,
    /// Cards older than this are stale (twice the publish interval by convention).
    pub stale_after_secs: u64,
    /// Leave this agent out (usually the caller itself).
    pub exclude_pubkey: Option<String>,
}

/// A discovery's outcome.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Discovery {
    pub agents: Vec<AgentCard>,
    /// Events that looked like cards and were dropped, with why.
    pub ignored: Vec<Ignored>,
    /// True when no relay answered and the agents come from the cache of earlier discoveries.
    pub from_cache: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Ignored {
    pub event_id: String,
    pub pubkey: String,
    pub reason: String,
}

/// Queries the client's relays for agent cards, keeps the valid newest one per agent, updates the cache and
/// returns those matching `query`. With no relay answering, answers from the cache.
pub async fn discover(
    client: &Client,
    db: &Db,
    query: &Query,
    timeout: Duration,
) -> Result<Discovery, NostrError> {
    let filter = Filter::new()
        .kind(Kind::Custom(CARD_KIND))
        .custom_tag(SingleLetterTag::lowercase(Alphabet::T), CARD_T_TAG);
    let fetched = relays::fetch(client, filter, timeout).await;
    let events = match fetched {
        Ok(events) => events,
        Err(e) => {
            tracing::warn!(error = %e, "no relay answered; using cached cards");
            let agents = cached(db).await?;
            return Ok(Discovery {
                agents: select(agents, query),
                ignored: Vec::new(),
                from_cache: true,
            });
        }
    };
    let (valid, ignored) = sift(events);
    store(db, &valid).await?;
    Ok(Discovery {
        agents: select(valid.into_iter().map(|(card, _)| card).collect(), query),
        ignored,
        from_cache: false,
    })
}

/// Checks every event, keeps the newest valid card per author.
pub fn sift(events: Vec<::nostr::Event>) -> (Vec<(AgentCard, String)>, Vec<Ignored>) {
    let mut newest: BTreeMap<String, (AgentCard, String)> = BTreeMap::new();
    let mut ignored = Vec::new();
    for event in events {
        match parse_card(&event) {
            Ok(card) => {
                let keep = newest
                    .get(&card.pubkey)
                    .is_none_or(|(old, _)| card.created_at > old.created_at);
                if keep {
                    newest.insert(card.pubkey.clone(), (card, event.as_json()));
                }
            }
            Err(reason) => {
                if reason != CardRejection::NotOurs {
                    tracing::info!(event_id = %event.id, pubkey = %event.pubkey, %reason, "ignoring a card");
                }
                ignored.push(Ignored {
                    event_id: event.id.to_hex(),
                    pubkey: event.pubkey.to_hex(),
                    reason: reason.to_string(),
                });
            }
        }
    }
    (newest.into_values().collect(), ignored)
}

fn select(mut agents: Vec<AgentCard>, query: &Query) -> Vec<AgentCard> {
    let now = Timestamp::now().as_secs();
    agents.retain(|card| {
        query.exclude_pubkey.as_deref() != Some(card.pubkey.as_str())
            && (query.include_stale
                || query.stale_after_secs == 0
                || !card.is_stale(now, query.stale_after_secs))
            && query.service.as_deref().is_none_or(|s| card.offers(s))
    });
    agents.sort_by_key(|a| std::cmp::Reverse(a.created_at));
    agents
}

async fn store(db: &Db, cards: &[(AgentCard, String)]) -> Result<(), NostrError> {
    let rows: Vec<(String, String, i64, String, String)> = cards
        .iter()
        .filter_map(|(card, json)| {
            serde_json::to_string(card).ok().map(|c| {
                (
                    card.pubkey.clone(),
                    card.event_id.clone(),
                    card.created_at as i64,
                    c,
                    json.clone(),
                )
            })
        })
        .collect();
    db.call(move |c| {
        let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let now = now_rfc3339();
        for (pubkey, event_id, created_at, card, json) in rows {
            tx.execute(
                "INSERT INTO nostr_agents (pubkey, event_id, created_at, card, event_json, seen_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6) \
                 ON CONFLICT(pubkey) DO UPDATE SET event_id = excluded.event_id, created_at = excluded.created_at, \
                   card = excluded.card, event_json = excluded.event_json, seen_at = excluded.seen_at \
                 WHERE excluded.created_at >= nostr_agents.created_at",
                params![pubkey, event_id, created_at, card, json, now],
            )?;
        }
        tx.commit()
    })
    .await?;
    Ok(())
}

/// Every cached card. Each was verified when it was fetched; it is re-verified here all the same, since the
/// DB is only as trustworthy as whatever last wrote it.
pub async fn cached(db: &Db) -> Result<Vec<AgentCard>, NostrError> {
    let jsons: Vec<String> = db
        .call(|c| {
            let mut stmt =
                c.prepare("SELECT event_json FROM nostr_agents ORDER BY created_at DESC")?;
            let rows = stmt.query_map([], |r| r.get(0))?;
            rows.collect()
        })
        .await?;
    Ok(jsons
        .into_iter()
        .filter_map(|j| ::nostr::Event::from_json(j).ok())
        .filter_map(|e| parse_card(&e).ok())
        .collect())
}

/// Runs a discovery from a fresh client on `relay_set`.
pub async fn discover_on(
    keys: &::nostr::Keys,
    relay_set: &relays::RelaySet,
    db: &Db,
    query: &Query,
    timeout: Duration,
) -> Result<Discovery, NostrError> {
    relay_set.require()?;
    let client = relays::client(keys, relay_set).await?;
    relays::wait_connected(&client, timeout.min(Duration::from_secs(5))).await;
    let result = discover(&client, db, query, timeout).await;
    client.shutdown().await;
    result
}

/// An agent's self-description (`/.well-known/automaton.json`), fields as the HTTP issue defines them; unknown
/// fields are kept in `extra`, wrongly typed ones dropped.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AgentDescription {
    pub url: String,
    pub name: Option<String>,
    pub node_id: Option<String>,
    pub npub: Option<String>,
    pub lightning_address: Option<String>,
    pub status: Option<String>,
    pub tier: Option<String>,
    pub services: Vec<DescribedService>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DescribedService {
    pub name: String,
    pub path: Option<String>,
    pub price_sats: Option<u64>,
    pub description: Option<String>,
}

/// The description URL for what the user typed: a bare origin gets `/.well-known/automaton.json`, a URL with
/// a path is taken as given.
pub fn description_url(input: &str) -> Result<reqwest::Url, NostrError> {
    let raw = input.trim();
    let with_scheme = if raw.contains("://") {
        raw.to_string()
    } else {
        format!("https://{raw}")
    };
    let mut url = reqwest::Url::parse(&with_scheme).map_err(|e| NostrError::Http {
        url: input.to_string(),
        reason: format!("not a URL: {e}"),
    })?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(NostrError::Http {
            url: input.to_string(),
            reason: "only http:// and https:// URLs describe agents".into(),
        });
    }
    if url.path() == "/" || url.path().is_empty() {
        url.set_path("/.well-known/automaton.json");
    }
    Ok(url)
}

/// Fetches and reads an agent description.
pub async fn fetch_description(
    input: &str,
    timeout: Duration,
) -> Result<AgentDescription, NostrError> {
    let url = description_url(input)?;
    let shown = url.to_string();
    let err = |reason: String| NostrError::Http {
        url: shown.clone(),
        reason,
    };
    let client = reqwest::Client::builder()
        .timeout(timeout)
        .build()
        .map_err(|e| err(e.to_string()))?;
    let mut response = client
        .get(url.clone())
        .header("accept", "application/json")
        .send()
        .await
        .map_err(|e| err(e.to_string()))?;
    let status = response.status();
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| err(e.to_string()))? {
        body.extend_from_slice(&chunk);
        if body.len() > MAX_DESCRIPTION_BYTES {
            return Err(err(format!(
                "body larger than {MAX_DESCRIPTION_BYTES} bytes"
            )));
        }
    }
    if !status.is_success() {
        return Err(err(format!("HTTP {status}")));
    }
    let value: Value = serde_json::from_slice(&body).map_err(|e| err(format!("not JSON: {e}")))?;
    parse_description(&shown, &value)
        .ok_or_else(|| err("not an agent description (expected a JSON object)".into()))
}

/// Lenient reading of an `automaton.json` document.
pub fn parse_description(url: &str, value: &Value) -> Option<AgentDescription> {
    let obj = value.as_object()?;
    let text = |key: &str| obj.get(key).and_then(Value::as_str).map(str::to_string);
    let services = obj
        .get("services")
        .and_then(Value::as_array)
        .map(|list| {
            list.iter()
                .filter_map(|s| {
                    let s = s.as_object()?;
                    let t = |key: &str| s.get(key).and_then(Value::as_str).map(str::to_string);
                    Some(DescribedService {
                        name: t("name").or_else(|| t("id"))?,
                        path: t("path").or_else(|| t("url")),
                        price_sats: s.get("price_sats").and_then(Value::as_u64),
                        description: t("description"),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    Some(AgentDescription {
        url: url.to_string(),
        name: text("name"),
        node_id: text("node_id"),
        npub: text("npub"),
        lightning_address: text("lightning_address"),
        status: text("status"),
        tier: text("tier"),
        services,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nostr::card::{card_event, CardContent, CardService, CardStatus};
    use ::nostr::Keys;

    fn card(name: &str, updated_at: u64, service: Option<&str>) -> CardContent {
        CardContent {
            name: name.into(),
            version: "automaton-ln/test".into(),
            status: CardStatus::Alive,
            services: service
                .map(|s| {
                    vec![CardService {
                        id: s.into(),
                        ..Default::default()
                    }]
                })
                .unwrap_or_default(),
            updated_at,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn newest_valid_card_per_agent_is_kept_and_cached() {
        let db = Db::open_in_memory().unwrap();
        let a = Keys::generate();
        let b = Keys::generate();
        let now = Timestamp::now().as_secs();
        let old = card_event(&a, &card("a-old", now - 100, None)).unwrap();
        let new = card_event(&a, &card("a-new", now - 10, Some("summarize"))).unwrap();
        let other = card_event(&b, &card("b", now - 5, None)).unwrap();
        let junk = ::nostr::EventBuilder::new(Kind::Custom(CARD_KIND), "not json")
            .tag(::nostr::Tag::identifier(super::super::CARD_D_TAG))
            .sign_with_keys(&b)
            .unwrap();
        let (valid, ignored) = sift(vec![old, new.clone(), other, junk]);
        assert_eq!(valid.len(), 2);
        assert_eq!(ignored.len(), 1);
        assert!(valid.iter().any(|(c, _)| c.name == "a-new"));
        store(&db, &valid).await.unwrap();
        let cached = cached(&db).await.unwrap();
        assert_eq!(cached.len(), 2);

        let query = Query {
            service: Some("summar".into()),
            stale_after_secs: 3600,
            ..Default::default()
        };
        let picked = select(cached.clone(), &query);
        assert_eq!(picked.len(), 1);
        assert_eq!(picked[0].name, "a-new");
        let query = Query {
            exclude_pubkey: Some(b.public_key().to_hex()),
            stale_after_secs: 3600,
            ..Default::default()
        };
        assert_eq!(select(cached.clone(), &query).len(), 1);
        let query = Query {
            stale_after_secs: 1,
            ..Default::default()
        };
        assert!(select(cached, &query).is_empty(), "all stale");
    }

    #[test]
    fn description_urls_and_lenient_parsing() {
        assert_eq!(
            description_url("http://127.0.0.1:8080").unwrap().as_str(),
            "http://127.0.0.1:8080/.well-known/automaton.json"
        );
        assert_eq!(
            description_url("agent.example").unwrap().as_str(),
            "https://agent.example/.well-known/automaton.json"
        );
        assert_eq!(
            description_url("https://a.example/x.json")
                .unwrap()
                .as_str(),
            "https://a.example/x.json"
        );
        assert!(description_url("ftp://a.example").is_err());
        let d = parse_description(
            "u",
            &serde_json::json!({"name": "atm", "node_id": 5, "services": [{"name": "s", "price_sats": 21}, 3],
                                "future": true}),
        )
        .unwrap();
        assert_eq!(d.name.as_deref(), Some("atm"));
        assert_eq!(d.node_id, None);
        assert_eq!(d.services.len(), 1);
        assert!(parse_description("u", &serde_json::json!([1])).is_none());
    }
}
